"""SparseLoRA over a 2:4 base on sparse tensor cores.

SparseLoRA's update ``ΔW = M ⊙ s·B A`` has the base's mask, so ``W + ΔW`` is 2:4 with the *same* pattern. Its fused
path (one GEMM with ``W + ΔW``, see :mod:`prune_peft.tuners._functional`) therefore maps onto one sparse GEMM: the
merged weight is compressed once per optimizer step (cached while W, A, B, M and s are unchanged, so gradient
accumulation, activation checkpointing and generation reuse it) and multiplied on sparse tensor cores. ``∂L/∂x = G (W + ΔW)`` is sparse too when the mask is transposable. The adapter
gradients are exactly those of :class:`~prune_peft.tuners._functional._MaskedLora` (``grad_mode`` respected).

Running the frozen base sparse and the masked branch ``x (M ⊙ s·BA)ᵀ`` separately would add a dense GEMM per
layer (the masked branch cannot be factored into low-rank products), which is slower than the dense fused path.
Plain LoRA does not have this problem: its branch is low-rank, so only the base layer is swapped.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..tuners._base import SparseAdapterLayer
from ..tuners._functional import masked_lora_factor_grads, masked_lora_weight
from ..tuners._masks import keep_values, unpack_mask
from .semi_structured import (
    SemiStructuredLinear,
    _compute_dtype,
    _Packed,
    _violations,
    _warn_once,
    pack,
    packed_linear,
)
from .sparse24 import is_transposable24

__all__ = ["attach_sparse_fused", "detach_sparse_fused"]


class _FusedPack:
    """Compressed ``W + M ⊙ s·BA`` (and its transpose, lazily) for one set of (W, A, B, M, s, dtype) versions.

    Reused while none of them changes: by every micro-batch of a gradient-accumulation step, by activation
    checkpointing's recomputation, and by every decoding step in generation; rebuilt after each optimizer step.
    """

    def __init__(self, key: tuple, make_weight, backend: str, name: str) -> None:
        self.key, self.make_weight, self.backend, self.name = key, make_weight, backend, name
        self._fwd: _Packed | None = None
        self._bwd: _Packed | None = None

    def fwd(self) -> _Packed:
        if self._fwd is None:  # 2:4 by construction (checked in _pp_fused_forward)
            self._fwd = pack(self.make_weight(), self.backend, self.name, check=False)
        return self._fwd

    def bwd(self) -> _Packed:
        if self._bwd is None:
            self._bwd = pack(self.make_weight().t().contiguous(), self.backend, self.name + " (Wᵀ)", check=False)
        return self._bwd


class _SparseMaskedLora(torch.autograd.Function):
    """``y = x (W + M ⊙ s·B A)ᵀ + b`` with the merged 2:4 weight on sparse tensor cores."""

    @staticmethod
    def forward(ctx, x, bias, A, B, packed_mask, width, scaling, exact, fused: _FusedPack, dtype, transposable):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            y = packed_linear(x2, fused.fwd(), bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(x, A, B, packed_mask)
        ctx.width, ctx.scaling, ctx.exact = width, scaling, exact
        ctx.fused, ctx.dtype, ctx.transposable = fused, dtype, transposable
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, packed_mask = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_bias, need_A, need_B = ctx.needs_input_grad[:4]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            gd = g2.to(ctx.dtype)
            if ctx.transposable:  # Wᵀ is 2:4 too: ∂L/∂x = G W on sparse tensor cores
                grad_x = packed_linear(gd, ctx.fused.bwd())
            else:
                grad_x = gd @ ctx.fused.make_weight()  # recomputed, not kept
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if need_A or need_B:  # the same gradients as the dense fused path
            keep = keep_values(packed_mask, ctx.width, A.dtype)
            grad_A, grad_B = masked_lora_factor_grads(g2, x2, A, B, keep, s, ctx.exact, need_A, need_B)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_A, grad_B, *([None] * 7)


class _SemiStructuredFusedMixin:
    """Placed before a SparseLoRA layer class: its fused forward runs the merged 2:4 weight sparse."""

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_pp_ss_fused_cache", None)  # compressed copies and closures: a cache, not state
        state.pop("_pp_ss_checked", None)
        return state

    def _pp_fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        base = self.get_base_layer()
        if not isinstance(base, SemiStructuredLinear):
            return super()._pp_fused_forward(x, adapter)
        backend, reason = base.semi_structured_backend(x)
        if backend == "dense":
            if reason:
                _warn_once(reason)
            return super()._pp_fused_forward(x, adapter)
        A, B, packed, width, scaling, exact = self._pp_args(adapter)
        problem = self._pp_ss_problem(base, packed, width)
        if problem:
            _warn_once(f"{base._pp_ss_name}: {problem}")
            return super()._pp_fused_forward(x, adapter)
        dtype = _compute_dtype(x)
        fused = self._pp_ss_fused(adapter, backend, dtype, A, B, packed, width, scaling, base)
        return _SparseMaskedLora.apply(
            x, base.bias, A, B, packed, width, scaling, exact, fused, dtype, base._pp_ss_transposable
        )

    def _pp_ss_fused(self, adapter, backend, dtype, A, B, packed, width, scaling, base) -> _FusedPack:
        w = base.weight
        key = (backend, dtype, float(scaling), *((t.data_ptr(), t._version) for t in (A, B, w, packed)))
        cache = self.__dict__.setdefault("_pp_ss_fused_cache", {})
        entry = cache.get(adapter)
        if entry is None or entry.key != key:

            @torch.no_grad()
            def make_weight() -> torch.Tensor:
                return masked_lora_weight(A, B, keep_values(packed, width, A.dtype), self._pp_weight, scaling).to(
                    dtype
                )

            entry = cache[adapter] = _FusedPack(key, make_weight, backend, base._pp_ss_name)
        return entry

    def _pp_ss_problem(self, base: SemiStructuredLinear, packed: torch.Tensor, width: int) -> str | None:
        """Why ``W + M ⊙ s·BA`` might not be 2:4 (None when it is): checked once per (weight, mask) version.

        supp(W + M ⊙ ΔW) ⊆ M ∪ supp(W) = M when the base has no non-zero outside M, and M is 2:4.
        """
        w = base.weight
        key = (w.data_ptr(), w._version, packed.data_ptr(), packed._version)
        cache = self.__dict__.setdefault("_pp_ss_checked", {})
        if key not in cache:
            mask = unpack_mask(packed, width)
            bad = _violations(mask)
            if bad:
                cache[key] = f"the adapter mask is not 2:4 ({bad} groups of 4 keep more than 2 weights)"
            elif bool((w.detach()[~mask] != 0).any()):
                cache[key] = "the base has non-zero weights outside the adapter mask"
            else:
                cache[key] = None
                base._pp_ss_transposable = is_transposable24(mask)
            if len(cache) > 4:
                cache.pop(next(iter(cache)))
        return cache[key]


@functools.cache
def _fused_class(cls: type) -> type:
    name = f"SemiStructured{cls.__name__}"
    new = type(name, (_SemiStructuredFusedMixin, cls), {"__module__": __name__, "__qualname__": name})
    globals().setdefault(name, new)  # importable by name, so pickling works
    return new


def _predefine() -> None:
    from ..tuners.sparse_lora.layer import SparseLoraLinear

    _fused_class(SparseLoraLinear)  # → SemiStructuredSparseLoraLinear, defined at import for unpickling


_predefine()


def _is_sparse_lora(layer: nn.Module) -> bool:
    return isinstance(layer, SparseAdapterLayer) and getattr(layer, "method", None) == "sparse_lora"


def attach_sparse_fused(model: nn.Module) -> list[str]:
    """Swap every SparseLoRA layer whose base is a :class:`SemiStructuredLinear` to the sparse fused forward."""
    names = []
    for name, layer in model.named_modules():
        if not _is_sparse_lora(layer) or isinstance(layer, _SemiStructuredFusedMixin):
            continue
        if getattr(layer, "quantized", False) or not isinstance(layer.get_base_layer(), SemiStructuredLinear):
            continue
        layer.__class__ = _fused_class(type(layer))
        names.append(name)
    return names


def detach_sparse_fused(model: nn.Module) -> None:
    """Undo :func:`attach_sparse_fused`."""
    for layer in model.modules():
        if isinstance(layer, _SemiStructuredFusedMixin):
            layer.__class__ = type(layer).__bases__[1]
