"""SparseLoRA over a 2:4 base on sparse tensor cores.

SparseLoRA's update ``ΔW = M ⊙ s·B A`` has the base's mask, so ``ΔW`` is 2:4 with the base's pattern. Adding it to
``W`` in half precision (the only dtypes sparse tensor cores serve) would round away every update below half an ulp
of the weight, so the two are *concatenated along the input dimension* instead: ``y = [x | x] [W | ΔW]ᵀ + b``, one
sparse GEMM with fp32 accumulation in which ``W`` and ``ΔW`` are never summed in half precision (each 2:4 group lies
inside ``W`` or inside ``ΔW``). ``[W | ΔW]`` is compressed once per optimizer step (cached while W, A, B, M and s are
unchanged, so gradient accumulation, activation checkpointing and generation reuse it). ``∂L/∂x = G W + G ΔW`` is one
sparse GEMM with ``[W | ΔW]ᵀ`` when the mask is transposable. The adapter gradients are exactly those of
:class:`~prune_peft.sparsity.adapters._MaskedLora` (``grad_mode`` respected).

Running the frozen base sparse and the masked branch ``x (M ⊙ s·BA)ᵀ`` as a dense GEMM would add a dense GEMM per
layer (the masked branch cannot be factored into low-rank products). Plain LoRA does not have this problem: its
branch is low-rank, so only the base layer is replaced.

Wiring: nothing here knows the adapter layers. A SparseLoRA layer whose base is a :class:`SemiStructuredLinear`
calls :func:`masked_lora_24` from its fused forward; the caches live on that base (dropped when it is copied or
pickled)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sparsity.adapters import _masked_product, masked_lora, masked_lora_factor_grads
from ..sparsity.packing import keep_values, unpack_mask
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

__all__ = ["fused_problem", "masked_lora_24"]


class _FusedPack:
    """Compressed ``[W | M ⊙ s·BA]`` (d_out × 2·d_in; its transpose lazily) for one set of (W, A, B, M, s, dtype) versions.

    Reused while none of them changes: by every micro-batch of a gradient-accumulation step, by activation
    checkpointing's recomputation, and by every decoding step in generation; rebuilt after each optimizer step.
    """

    def __init__(self, key: tuple, make_weight, backend: str, name: str) -> None:
        self.key, self.make_weight, self.backend, self.name = key, make_weight, backend, name
        self._fwd: _Packed | None = None
        self._bwd: _Packed | None = None

    def fwd(self) -> _Packed:
        if self._fwd is None:  # 2:4 by construction (checked in masked_lora_24)
            self._fwd = pack(self.make_weight(), self.backend, self.name, check=False)
        return self._fwd

    def bwd(self) -> _Packed:
        if self._bwd is None:
            self._bwd = pack(self.make_weight().t().contiguous(), self.backend, self.name + " (Wᵀ)", check=False)
        return self._bwd


class _SparseMaskedLora(torch.autograd.Function):
    """``y = [x | x] [W | M ⊙ s·B A]ᵀ + b`` (= ``x (W + ΔW)ᵀ + b``) on sparse tensor cores, in ``dtype``."""

    @staticmethod
    def forward(ctx, x, bias, A, B, packed_mask, width, scaling, grad_mode, fused: _FusedPack, dtype, transposable):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = packed_linear(torch.cat([x2, x2], dim=1), fused.fwd(), bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(x, A, B, packed_mask)
        ctx.width, ctx.scaling, ctx.grad_mode = width, scaling, grad_mode
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
            if ctx.transposable:  # [W | ΔW]ᵀ is 2:4 too: G [W | ΔW] on sparse tensor cores
                both = packed_linear(gd, ctx.fused.bwd())
            else:
                both = gd @ ctx.fused.make_weight()  # recomputed, not kept
            w = ctx.width
            grad_x = (both[:, :w].float() + both[:, w:].float()).reshape(x.shape).to(x.dtype)
        if need_A or need_B:  # the same gradients as the dense path
            keep = keep_values(packed_mask, ctx.width, A.dtype)
            grad_A, grad_B = masked_lora_factor_grads(g2, x2, A, B, keep, s, ctx.grad_mode, need_A, need_B, ctx.dtype)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_A, grad_B, *([None] * 7)


def masked_lora_24(
    x: torch.Tensor,
    base: SemiStructuredLinear,
    weight: Callable[[], torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    packed_mask: torch.Tensor,
    width: int,
    scaling: float,
    grad_mode: str,
    adapter: str,
) -> torch.Tensor:
    """SparseLoRA's forward ``x (W + M ⊙ s·B A)ᵀ + b`` over a 2:4 ``base``: one sparse GEMM on ``[W | ΔW]`` when the
    backend and the mask allow it, else the dense path
    (:func:`~prune_peft.sparsity.adapters.masked_lora`, same arguments) with one warning per reason.

    ``weight`` gives the base weight ``W`` (the adapter layer's ``_pp_weight``); ``packed_mask``/``width`` are the
    bit-packed adapter mask ``M`` and the number of input features; ``adapter`` names the cache entry on ``base``.
    """
    backend, reason = base.semi_structured_backend(x)
    problem = None if backend == "dense" else fused_problem(base, packed_mask, width)
    if backend == "dense" or problem:
        if reason or problem:
            _warn_once(reason or f"{base._pp_ss_name}: {problem}")
        return masked_lora(x, weight, base.bias, A, B, packed_mask, width, scaling, grad_mode)
    dtype = _compute_dtype(x)
    fused = _fused_pack(base, adapter, backend, dtype, weight, A, B, packed_mask, width, scaling)
    return _SparseMaskedLora.apply(
        x, base.bias, A, B, packed_mask, width, scaling, grad_mode, fused, dtype, base._pp_ss_transposable
    )


def _fused_pack(base, adapter, backend, dtype, weight, A, B, packed, width, scaling) -> _FusedPack:
    """The cached pack of ``[W | M ⊙ s·BA]`` for this adapter, made anew when any operand changed."""
    w = base.weight
    key = (backend, dtype, float(scaling), *((t.data_ptr(), t._version) for t in (A, B, w, packed)))
    entry = base._pp_ss_fused.get(adapter)
    if entry is None or entry.key != key:

        @torch.no_grad()
        def make_weight() -> torch.Tensor:
            delta = _masked_product(A, B, keep_values(packed, width, A.dtype), scaling)
            return torch.cat([weight().to(dtype), delta.to(dtype)], dim=1)

        entry = base._pp_ss_fused[adapter] = _FusedPack(key, make_weight, backend, base._pp_ss_name)
    return entry


def fused_problem(base: SemiStructuredLinear, packed: torch.Tensor, width: int) -> str | None:
    """Why ``W + M ⊙ s·BA`` might not be 2:4 (None when it is): checked once per (weight, mask) version.

    supp(W + M ⊙ ΔW) ⊆ M ∪ supp(W) = M when the base has no non-zero outside M, and M is 2:4.
    """
    w = base.weight
    key = (w.data_ptr(), w._version, packed.data_ptr(), packed._version)
    cache = base._pp_ss_checked
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
