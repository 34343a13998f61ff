"""A frozen 2:4 base on sparse tensor cores, with PyTorch core ops (cuSPARSELt / CUTLASS), and an exact fallback.

``y = x Wᵀ + b`` where ``W`` is 2:4 sparse (2 non-zeros in every 4 consecutive weights of a row):

* forward: ``W`` is compressed once (cached, re-made only when the weight changes) into PyTorch's
  ``SparseSemiStructuredTensorCUSPARSELT`` (or ``…CUTLASS`` on sm8x without cuSPARSELt, packed by our Triton
  kernel) and ``F.linear`` runs the sparse GEMM;
* backward: ``∂L/∂x = G W`` runs sparse too when the mask is *transposable* (``Wᵀ`` is also 2:4, see
  :func:`~prune_peft.kernels.sparse24.transposable_mask24`), through a compressed ``Wᵀ``; otherwise it is a dense
  GEMM. A trainable weight gets the masked gradient ``(Gᵀ X) ⊙ M`` (M = ``W ≠ 0``), i.e. exactly the gradient of
  ``F.linear(x, W ⊙ M)``, so the pattern survives the optimizer step;
* shapes: the weight is zero-padded to the backend's tile multiples (cuSPARSELt 16×16, CUTLASS 32×64 for 16-bit
  types) and the output sliced back; PyTorch pads the token dimension itself;
* fallback: on CPU, on GPUs below sm80, for fp32 (cuSPARSELt ≥ 0.6.2 dropped it, pytorch#134022) and on Hopper
  without cuSPARSELt (CUTLASS 2:4 is sm8x-only), the layer runs the dense ``F.linear(x, W ⊙ M, b)`` — bitwise the
  same as ``nn.Linear`` — and warns once per reason.

The compute dtype follows ``nn.Linear`` semantics: the autocast dtype when autocast is on, else the input dtype.
Speed expectations are honest in docs/kernels.md: 2:4 only pays off at large GEMMs (pytorch#111339, ao#1617).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..sparsity.masks import nm_violations
from .sparse24 import compress24, decompress24, is_transposable24

__all__ = [
    "SemiStructuredFallbackWarning",
    "SemiStructuredLinear",
    "choose_backend",
    "disable_semi_structured",
    "enable_semi_structured",
    "semi_structured_status",
]

Backend = Literal["auto", "cusparselt", "cutlass", "dense", "emulate"]
BACKENDS = ("auto", "cusparselt", "cutlass", "dense", "emulate")

# (rows, cols) multiples the compressed weight must have, per backend (PyTorch's _DTYPE_SHAPE_CONSTRAINTS)
_TILE = {"cusparselt": (16, 16), "cutlass": (32, 64), "emulate": (32, 64)}


class SemiStructuredFallbackWarning(UserWarning):
    """The 2:4 sparse path is unavailable here; the exact dense path runs instead (emitted once per reason)."""


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(
        f"prune_peft 2:4 semi-structured: {reason}; running the exact dense path instead (same numbers, no speedup)",
        SemiStructuredFallbackWarning,
        stacklevel=4,
    )


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    cusparselt_available: bool,
    requested: Backend = "auto",
) -> tuple[str, str | None]:
    """Pure dispatch decision: ``(backend, reason)``; ``reason`` says why the dense fallback was chosen.

    cuSPARSELt is preferred (sm80+, Hopper included); CUTLASS is the sm8x-only alternative. fp16/bf16 only.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    dtype_reason = f"dtype {dtype} is not supported by 2:4 sparse tensor cores here (float16/bfloat16 only)"
    if requested == "dense":
        return requested, None
    if requested == "emulate":
        return ("emulate", None) if half else ("dense", dtype_reason)
    if device_type != "cuda":
        return "dense", f"device '{device_type}' has no sparse tensor cores (2:4 needs an NVIDIA GPU, sm80+)"
    if not half:
        return "dense", dtype_reason
    if capability is None or capability < (8, 0):
        return "dense", f"GPU compute capability {capability} is below sm80 (Ampere), no 2:4 sparse tensor cores"
    if requested in ("auto", "cusparselt") and cusparselt_available:
        return "cusparselt", None
    if requested == "cusparselt":
        return "dense", "cuSPARSELt is not available in this PyTorch build"
    if capability[0] == 8:
        return "cutlass", None
    return "dense", (
        f"sm{capability[0]}{capability[1]} needs cuSPARSELt for 2:4 (PyTorch's CUTLASS 2:4 kernels are sm8x-only) "
        "and this PyTorch build has none"
    )


def _backend_for(device: torch.device, dtype: torch.dtype, requested: Backend) -> tuple[str, str | None]:
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cslt = bool(device.type == "cuda" and torch.backends.cusparselt.is_available())
    return choose_backend(device.type, dtype, cap, cslt, requested)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _violations(weight: torch.Tensor) -> int:
    return nm_violations(weight, 2, 4)


def check_24(weight: torch.Tensor, name: str) -> None:
    """ValueError naming the module and the number of groups of 4 with more than 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[-1] % 4:
        raise ValueError(
            f"2:4 semi-structured: module {name} has weight shape {tuple(weight.shape)}; 2:4 needs a 2-D weight "
            "whose in_features is divisible by 4"
        )
    bad = _violations(weight)
    if bad:
        groups = weight.numel() // 4
        raise ValueError(
            f"2:4 semi-structured: module {name} is not 2:4 sparse: {bad} of {groups} groups of 4 consecutive "
            "weights hold more than 2 non-zeros. Prune it first (prune_peft.prune(model, pattern='2:4', ...)) or "
            "leave it out (modules=...)"
        )


# ------------------------------------------------------------------------------------------------------ packing


@dataclass
class _Packed:
    """A compressed 2:4 matrix (out × in), zero-padded to the backend's tiles."""

    backend: str
    handle: Any  # SparseSemiStructuredTensor, or (values, meta) for "emulate"
    rows: int
    cols: int
    rows_padded: int
    cols_padded: int


# cuSPARSELt algorithm per (device, rows, cols, power-of-two token bucket), from cuSPARSELt's own search (bf16
# row-major path). Keyed by shape, not by matrix: SparseLoRA repacks [W | ΔW] after every optimizer step.
_CSLT_ALG: dict[tuple, int] = {}


def _pad2d(w: torch.Tensor, rm: int, cm: int) -> torch.Tensor:
    pr, pc = (-w.shape[0]) % rm, (-w.shape[1]) % cm
    return F.pad(w, (0, pc, 0, pr)) if pr or pc else w


def pack(weight: torch.Tensor, backend: str, name: str = "weight", check: bool = True) -> _Packed:
    """Validate (2:4) and compress a dense 2-D matrix for ``backend`` ("cusparselt", "cutlass" or "emulate").

    ``check=False`` only where the pattern is guaranteed by construction (the packers would silently drop a third
    non-zero in a group).
    """
    if check:
        check_24(weight, name)
    rm, cm = _TILE[backend]
    w = _pad2d(weight.contiguous(), rm, cm).contiguous()
    if backend == "emulate":  # CPU stand-in for CUTLASS: real packing, dense matmul on the unpacked matrix
        handle: Any = compress24(w, check=False)
    else:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")
            if backend == "cusparselt":
                handle = SparseSemiStructuredTensorCUSPARSELT.from_dense(w)
            else:
                values, meta = compress24(w, check=False)  # Triton on CUDA; bitwise PyTorch's layout
                handle = SparseSemiStructuredTensorCUTLASS(
                    w.shape, values, meta, None, None, None, requires_grad=False
                )
    return _Packed(backend, handle, weight.shape[0], weight.shape[1], w.shape[0], w.shape[1])


def packed_linear(x2d: torch.Tensor, packed: _Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d @ Wᵀ (+ b)`` with the compressed ``W``; ``x2d`` is (tokens, in) in the packed dtype."""
    if packed.cols_padded != packed.cols:
        x2d = F.pad(x2d, (0, packed.cols_padded - packed.cols))
    if bias is not None and packed.rows_padded != packed.rows:
        bias = F.pad(bias, (0, packed.rows_padded - packed.rows))
    if packed.backend == "emulate":
        y = F.linear(x2d, decompress24(*packed.handle), bias)
    elif packed.backend == "cusparselt" and x2d.dtype == torch.bfloat16:
        y = _cslt_row_major(x2d.contiguous(), packed)
        if bias is not None:
            y = y + bias
    else:
        # PyTorch computes W·xᵀ and returns its transpose, a column-major view: downstream kernels then leave their
        # fast paths (on an H200, SDPA fell back to fp32 math attention on q/k/v views of it), so one copy makes it
        # row-major. fp16: cuSPARSELt's transpose_result ran ~100× slower than this on an H200 (torch 2.11).
        y = F.linear(x2d.contiguous(), packed.handle, bias)
    y = y[:, : packed.rows] if packed.rows_padded != packed.rows else y
    return y.contiguous()  # row-major (a no-op where it already is)


def _cslt_row_major(x2d: torch.Tensor, packed: _Packed) -> torch.Tensor:
    """``x Wᵀ`` (tokens × out) written row-major by cuSPARSELt itself (``transpose_result``), bf16.

    The op under PyTorch's ``SparseSemiStructuredTensorCUSPARSELT`` (``torch._cslt_sparse_mm``), called directly for
    two of its options: the fused transpose (no copy of the output) and the algorithm id, which cuSPARSELt's own
    search (``torch._cslt_sparse_mm_search``) picks once per shape and power-of-two token bucket; on an H200 the default
    algorithm with the fused transpose ran at 0.87× dense bf16 and the searched one at 1.25–1.34×.
    """
    n = x2d.shape[0]
    pad = (-n) % 8  # cuSPARSELt's dense operand: rows in multiples of 8 for 16-bit types
    xp = F.pad(x2d, (0, 0, 0, pad)) if pad else x2d
    compressed = packed.handle.packed
    key = (x2d.device, packed.rows_padded, packed.cols_padded, 1 << max(3, (xp.shape[0] - 1).bit_length()))
    alg = _CSLT_ALG.get(key)
    if alg is None:
        try:
            with warnings.catch_warnings():  # torch 2.11 marks the search deprecated (a successor is not public yet)
                warnings.simplefilter("ignore", UserWarning)
                found = torch._cslt_sparse_mm_search(compressed, xp.t(), transpose_result=True)
            alg = int(found if isinstance(found, int) else found[0])
        except (AttributeError, RuntimeError):  # a PyTorch without the search: the default algorithm
            alg = 0
        _CSLT_ALG[key] = alg
    y = torch._cslt_sparse_mm(compressed, xp.t(), transpose_result=True, alg_id=alg)
    return y[:n] if pad else y


# ------------------------------------------------------------------------------------------------------ autograd


class _SparseLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with a compressed forward ``W`` and (when transposable) a compressed ``Wᵀ`` for ``∂L/∂x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, fwd: _Packed, bwd_fn: Callable[[], _Packed | None], dtype: torch.dtype):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            b = bias.to(dtype) if bias is not None else None
            y = packed_linear(x2, fwd, b)
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.bwd_fn, ctx.dtype, ctx.x_shape, ctx.x_dtype = bwd_fn, dtype, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if need_x:
            bwd = ctx.bwd_fn()
            if bwd is not None:  # transposable: Wᵀ is 2:4, ∂L/∂x = G W = G (Wᵀ)ᵀ on sparse tensor cores
                grad_x = packed_linear(g2, bwd)
            else:
                grad_x = g2 @ weight.to(ctx.dtype)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if need_w:
            # gradient of F.linear(x, W ⊙ M): masked, so the 2:4 pattern survives the optimizer step
            x2 = x.reshape(-1, x.shape[-1]).to(ctx.dtype)
            grad_w = (g2.t() @ x2).mul_(weight != 0).to(weight.dtype)
        if need_b:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fwd: _Packed,
    bwd_fn: Callable[[], _Packed | None],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Autograd-aware 2:4 linear on prepacked operands (``bwd_fn`` lazily gives the packed ``Wᵀ`` or None)."""
    return _SparseLinearFn.apply(x, weight, bias, fwd, bwd_fn, dtype)


# -------------------------------------------------------------------------------------------------------- module


# hook dictionaries of an nn.Module: shared (not copied) by a replacement module, so existing handles still remove
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# per-instance state of the 2:4 layer: not carried back to a plain nn.Linear
_OWN_STATE = ("_pp_ss_backend", "_pp_ss_name", "_pp_ss_cache", "_pp_ss_transposable", "_pp_ss_fused", "_pp_ss_checked")


def _carry_over(old: nn.Module, new: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give ``new`` the parameters (the same objects), buffers, hooks, mode and other attributes of ``old``."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)  # the same Parameter: optimizers and tied weights keep pointing at it
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    new.train(old.training)
    own = vars(new)
    for key, value in vars(old).items():
        if key in _HOOK_DICTS or (key not in own and key not in skip and key != "forward"):
            object.__setattr__(new, key, value)


class SemiStructuredLinear(nn.Linear):
    """``nn.Linear`` whose 2:4 weight runs on sparse tensor cores.

    :func:`enable_semi_structured` puts one in place of each selected ``nn.Linear`` (on its parent module), holding
    the *same* ``Parameter`` objects, hooks and attributes, so state-dict keys, optimizer references and peft's
    wrappers are unchanged; :meth:`from_linear` does it for a single layer. The compressed copies are a cache (not
    saved, not copied), rebuilt when the weight's storage, version, device or the compute dtype changes. Memory: the
    dense weight stays (merges, saving, fallback), plus ½ of it (+ metadata) for ``W`` and, when transposable, the
    same again for ``Wᵀ``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Backend = "auto",
        name: str = "linear",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._pp_ss_backend: Backend = backend
        self._pp_ss_name = name
        self._pp_ss_reset()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, backend: Backend = "auto", name: str = "linear"
    ) -> SemiStructuredLinear:
        """A 2:4 layer sharing ``linear``'s parameters (ValueError if its weight is not 2:4); ``linear`` is untouched.

        For a model use :func:`enable_semi_structured`, which also puts the new layers in place.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if type(linear) is not nn.Linear:
            raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if hasattr(linear, "_hf_hook"):
            raise ValueError(
                f"linear ({name}) has an accelerate hook (device_map offloading); 2:4 layers need the weight on the "
                "GPU: load the model without offloading"
            )
        if linear.weight.device.type != "meta":
            check_24(linear.weight.detach(), name)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", backend=backend, name=name)
        _carry_over(linear, new)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters, hooks and attributes (the 2:4 caches dropped)."""
        new = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        _carry_over(self, new, skip=_OWN_STATE)
        return new

    def _pp_ss_reset(self) -> None:
        self._pp_ss_cache: dict = {}
        self._pp_ss_transposable: bool | None = None
        # caches of adapters stacked on this base (kernels.adapters: merged W + ΔW packs, mask checks)
        self._pp_ss_fused: dict = {}
        self._pp_ss_checked: dict = {}

    def __getstate__(self):
        state = super().__getstate__().copy()
        # compressed copies and closures: a cache, not state
        state["_pp_ss_cache"], state["_pp_ss_fused"], state["_pp_ss_checked"] = {}, {}, {}
        return state

    def semi_structured_backend(self, x: torch.Tensor) -> tuple[str, str | None]:
        """The backend the next forward with input ``x`` will use, and why not sparse (if so)."""
        return _backend_for(x.device, _compute_dtype(x), self._pp_ss_backend)

    def _pp_ss_packed(self, backend: str, dtype: torch.dtype) -> tuple[_Packed, Callable[[], _Packed | None]]:
        w = self.weight
        key = (backend, dtype, w.device)
        version = (w.data_ptr(), w._version)
        entry = self._pp_ss_cache.get(key)
        if entry is None or entry["version"] != version:
            dense = w.detach().to(dtype)
            if entry is None or entry["version"][0] != version[0] or self._pp_ss_transposable is None:
                self._pp_ss_transposable = is_transposable24(dense)
            entry = {"version": version, "fwd": pack(dense, backend, self._pp_ss_name), "bwd": None}
            self._pp_ss_cache = {key: entry}  # one live entry: memory stays bounded

        def bwd() -> _Packed | None:
            if not self._pp_ss_transposable:
                return None
            if entry["bwd"] is None:
                entry["bwd"] = pack(w.detach().to(dtype).t().contiguous(), backend, self._pp_ss_name + " (Wᵀ)")
            return entry["bwd"]

        return entry["fwd"], bwd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend, reason = self.semi_structured_backend(x)
        if backend == "dense":
            if reason:
                _warn_once(reason)
            if self.weight.requires_grad:
                # same values as F.linear(x, W) (W is 2:4); the product masks the gradient like the sparse path
                return F.linear(x, self.weight * (self.weight.detach() != 0), self.bias)
            return F.linear(x, self.weight, self.bias)
        dtype = _compute_dtype(x)
        try:
            fwd, bwd = self._pp_ss_packed(backend, dtype)
        except ValueError as err:
            # the weight stopped being 2:4 after it was checked (e.g. a plain-LoRA merge made it dense): from now on
            # this layer runs dense — correct numbers, one warning
            self._pp_ss_backend = "dense"
            self._pp_ss_cache = {}
            _warn_once(f"{self._pp_ss_name} changed and is no longer 2:4 ({err})")
            return self.forward(x)
        return sparse_linear(x, self.weight, self.bias, fwd, bwd, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", semi_structured=2:4, backend={self._pp_ss_backend}"


# ------------------------------------------------------------------------------------------------ model-level API


def _tuner_children(model: nn.Module) -> set[int]:
    """ids of modules inside peft tuner layers other than their base layer (adapters: lora_A, lora_B, ...)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base_ids = {id(m) for m in module.get_base_layer().modules()}
            for child in module.modules():
                if child is not module and id(child) not in base_ids:
                    skip.add(id(child))
    return skip


def _selector(modules) -> Callable[[str], bool] | None:
    if modules is None:
        return None
    if callable(modules):
        return modules
    if isinstance(modules, str):
        pattern = re.compile(modules)
        return lambda name: bool(pattern.fullmatch(name) or pattern.search(name))
    names = set(modules)
    return lambda name: name in names or any(name.endswith("." + n) or name == n for n in names)


def _candidates(model: nn.Module, modules) -> list[tuple[str, nn.Linear, bool]]:
    """(name, layer, explicitly selected) for every plain float linear layer that is not a peft adapter factor."""
    select = _selector(modules)
    skip = _tuner_children(model)
    out = []
    for name, module in model.named_modules():
        if id(module) in skip or type(module) not in (nn.Linear, SemiStructuredLinear):
            continue
        if select is not None and not select(name):
            continue
        if not module.weight.dtype.is_floating_point:
            continue
        if hasattr(module, "_hf_hook"):
            _warn_once(f"{name} has an accelerate hook (device_map offloading) and is left a plain nn.Linear")
            continue
        out.append((name, module, select is not None))
    return out


def _root_linear_error(model: nn.Module, method: str) -> ValueError:
    return ValueError(
        f"model is itself a {type(model).__name__}: the 2:4 layer replaces a module on its parent, and this one has "
        f"none. Use prune_peft.kernels.SemiStructuredLinear.{method} for a single layer"
    )


def _replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Set ``new[id(old)]`` on the parent wherever ``old`` is a child in ``model`` (every path of a shared module)."""
    paths = [name for name, m in model.named_modules(remove_duplicate=False) if name and id(m) in new]
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new[id(getattr(parent, child))])


def convert_linears(model: nn.Module, named: Iterable[tuple[str, nn.Linear]], backend: Backend = "auto") -> None:
    """Put a :class:`SemiStructuredLinear` (same parameters) in place of each given ``nn.Linear`` of ``model``.

    ``named`` holds ``(name used in messages, layer)``; the layers must already be checked to be 2:4. A layer that is
    already a :class:`SemiStructuredLinear` only takes the new backend and name.
    """
    new: dict[int, nn.Module] = {}
    for name, module in named:
        if type(module) is SemiStructuredLinear:
            module._pp_ss_backend, module._pp_ss_name = backend, name
            module._pp_ss_reset()
        elif id(module) not in new:
            replacement = SemiStructuredLinear(
                module.in_features, module.out_features, module.bias is not None, "meta", backend=backend, name=name
            )
            _carry_over(module, replacement)
            new[id(module)] = replacement
    _replace_modules(model, new)


def enable_semi_structured(
    model: nn.Module,
    modules: str | Iterable[str] | Callable[[str], bool] | None = None,
    *,
    backend: Backend = "auto",
) -> list[str]:
    """Run the 2:4 linear layers of ``model`` on sparse tensor cores (cuSPARSELt/CUTLASS); returns their names.

    Each selected ``nn.Linear`` is replaced, on its parent module, by a :class:`SemiStructuredLinear` holding the same
    ``Parameter`` objects (state-dict keys and optimizer references are unchanged). ``modules=None`` takes every
    ``nn.Linear`` (including base layers inside peft LoRA layers, never the adapter factors) that has zero weights;
    fully dense layers (e.g. ``lm_head``) are left alone. A selected layer that has zeros but is not 2:4 raises
    ``ValueError`` naming it and the number of offending groups — before anything is changed. ``modules`` may be a
    list of names (suffixes match), a regex, or a predicate on the module name. ``backend``: "auto" (cuSPARSELt,
    else CUTLASS on sm8x, else the dense fallback with one warning), "cusparselt", "cutlass", "dense" (force the
    exact dense path) or "emulate" (CPU stand-in that packs with PyTorch's CUTLASS layout, for tests). A bare
    ``nn.Linear`` has no parent to be replaced on: use :meth:`SemiStructuredLinear.from_linear`.

    SparseLoRA layers over a replaced base run their fused forward ``W + M ⊙ s·BA`` as one sparse GEMM (see
    :mod:`prune_peft.kernels.adapters`).

    Example:

        ```py
        >>> model = get_peft_model(pruned_24_model, LoraConfig(r=16, target_modules="all-linear"))
        >>> prune_peft.kernels.enable_semi_structured(model)  # frozen 2:4 bases → sparse GEMMs on sm80+
        ```
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if type(model) in (nn.Linear, SemiStructuredLinear):
        raise _root_linear_error(model, "from_linear(linear, backend=...)")
    chosen = []
    for name, module, explicit in _candidates(model, modules):
        w = module.weight
        if w.device.type != "meta":
            if not explicit and not bool((w == 0).any()):
                continue  # a dense layer that was never pruned (lm_head, ...)
            check_24(w.detach(), name)
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            "enable_semi_structured: no 2:4-sparse nn.Linear layer found"
            + (f" among modules={modules!r}" if modules is not None else "")
            + "; prune the model first (prune_peft.prune(model, pattern='2:4', ...))"
        )
    convert_linears(model, chosen, backend)
    return [name for name, _ in chosen]


def enable_for_bases(model: nn.Module, bases: dict[str, nn.Module], backend: Backend = "auto") -> list[str]:
    """``SparseLoraConfig(use_semi_structured=True)``: ``bases`` maps each adapter layer's name to its base layer;
    every ``nn.Linear`` one must be 2:4 (ValueError naming the module and the offending group count, before any
    replacement); other base types (quantized, custom) stay as they are, with one warning."""
    chosen = []
    for name, base in bases.items():
        if type(base) not in (nn.Linear, SemiStructuredLinear):
            _warn_once(f"{type(base).__name__} bases (quantized or custom linear layers) are not supported")
            continue
        if hasattr(base, "_hf_hook"):
            _warn_once(f"{name} has an accelerate hook (device_map offloading) and is left a plain nn.Linear")
            continue
        if base.weight.device.type != "meta":
            check_24(base.weight.detach(), name)
        chosen.append((name, base))
    convert_linears(model, [(n, b) for n, b in chosen if type(b) is not SemiStructuredLinear], backend)
    return [name for name, _ in chosen]


def disable_semi_structured(model: nn.Module) -> list[str]:
    """Undo :func:`enable_semi_structured`: plain ``nn.Linear`` layers (same parameters) go back in place of the 2:4
    layers; returns their names."""
    if type(model) is SemiStructuredLinear:
        raise _root_linear_error(model, "to_linear()")
    names, new = [], {}
    for name, module in model.named_modules():
        if type(module) is SemiStructuredLinear:
            new[id(module)] = module.to_linear()
            names.append(name)
    _replace_modules(model, new)
    return names


def semi_structured_status(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """``{module name: backend}`` of every 2:4 layer; with an ``example`` input on the target device and dtype, the
    backend the next forward would take ("cusparselt", "cutlass", "dense: <reason>")."""
    out = {}
    for name, module in model.named_modules():
        if type(module) is SemiStructuredLinear:
            if example is None:
                out[name] = module._pp_ss_backend
            else:
                backend, reason = module.semi_structured_backend(example)
                out[name] = backend if reason is None else f"dense: {reason}"
    return out
