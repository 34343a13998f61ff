"""Sparsity-preserving adapter updates and their autograd (pure tensor code); the dense d_out×d_in update is never
stored in the graph.

Two weight updates, both zero wherever the base weight is zero, so ``W + ΔW`` keeps the base's sparsity:

* SparsePEFT (SQFT, Muñoz et al., EMNLP Findings 2024, arXiv 2410.03750): ``ΔW = M ⊙ s·B A``.
* SPP (Lu et al., ICML 2024, arXiv 2405.16057): ``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``, where ``Rep`` repeats
  row k of ``W_row ∈ R^{R×d_in}`` over the k-th block of output rows.

Plain autograd through these formulas keeps the dense ``ΔW`` (and its intermediates) alive until backward — one
d_out×d_in tensor per adapted layer, more than the whole LoRA graph. Following LoRS (Hu et al., arXiv 2501.08582),
the functions below save only their inputs (activation, adapter factors, the packed mask; the frozen weight is
fetched again through a callable) and *recompute* the update in backward. Gradients are exact by default; SparseLoRA
additionally offers LoRS's "graph rearrangement" (``grad_mode="lors"``): the factor gradients drop the mask (and, as
in LoRS, the scale s), which saves the one extra dense ``Gᵀ X`` product per layer.

Precision. The update is formed in the adapter dtype and is never added to the weight in half precision, where any
``|ΔW_ij| <`` half an ulp of ``W_ij`` would be rounded away (for SPP every ``|S| < 2⁻⁸`` in bf16). The GEMMs run in
the *compute dtype*: the autocast dtype when autocast is on for the input's device (autocast is respected, never
switched off), else the input's dtype.

* compute dtype fp32/fp64: the update is fused into the base matmul, ``y = x (W + ΔW)ᵀ + b`` with ``W + ΔW`` in
  (at least) fp32: one GEMM forward and one for ``∂L/∂x``.
* compute dtype fp16/bf16: ``y = [x | x] [W | ΔW]ᵀ + b`` — one GEMM in the compute dtype over both halves, so
  ``x Wᵀ + x ΔWᵀ`` is summed in the GEMM's fp32 accumulator and the output is rounded once; ``ΔW`` is rounded to
  the compute dtype only relative to itself. This is also exactly what the 2:4 sparse-tensor-core path computes
  (:mod:`prune_peft.kernels.adapters`), so sparse kernels change speed, not numbers.

Measured on one 1536×576 layer with 4×256 bf16 tokens (CPU, 2 threads, forward + ``∂L/∂x``, median of 7): two bf16
GEMMs ``x Wᵀ + x ΔWᵀ`` 66 ms, one fp32 GEMM on ``W + ΔW`` ("fused with fp32 accumulation") 126 ms, the branch in
the fp32 adapter dtype as peft computes LoRA's 173 ms; on a loaded machine two bf16 GEMMs 324–332 ms,
``[x | x] [W | ΔW]ᵀ`` 412 ms, fused fp32 550 ms. The two-GEMM form is ~25 % faster than the concatenated one but
rounds the output twice (base output, then the sum), which biases updates below an output ulp towards zero; the
concatenated form rounds once (the update moves outputs without bias) and is still well ahead of fp32 fusing.

Merges are computed in (at least) fp32 and cast once to the base dtype: an exact zero stays exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .packing import keep_values

__all__ = [
    "GRAD_MODES",
    "compute_dtype",
    "kept_rows",
    "masked_lora",
    "masked_lora_delta",
    "masked_lora_factor_grads",
    "masked_lora_merged",
    "masked_lora_weight",
    "spp",
    "spp_branch",
    "spp_delta",
    "spp_merged",
    "spp_scale",
]

WeightFn = Callable[[], torch.Tensor]
HALF = (torch.float16, torch.bfloat16)
# "exact": true gradients; "lors": LoRS's rearranged factor gradients (mask and scale dropped, as its LorsFn does);
# "lors_scaled": the rearranged gradients times s (plain-LoRA gradients: prune_peft's behaviour before 0.x)
GRAD_MODES = ("exact", "lors", "lors_scaled")

# Benchmarks only (benchmarks/adapters.py): the pre-fix fused path, ``x · cast_to_base_dtype(W + ΔW)ᵀ`` with autocast
# switched off, which rounds away updates below half an ulp of the weight in fp16/bf16. Never set it in training.
_LEGACY_ROUNDED_FUSE = False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs of a layer with input ``x`` run in: the autocast dtype when autocast is on for ``x``'s
    device, else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and fp32: where ``W + ΔW`` is formed without rounding the update away."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _fuses(cd: torch.dtype) -> bool:
    return cd not in HALF or _LEGACY_ROUNDED_FUSE


def _pair(weight: torch.Tensor, delta: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``[W | ΔW]`` (d_out × 2·d_in) in ``dt``: ``[x | x] [W | ΔW]ᵀ = x (W + ΔW)ᵀ`` with the sum in the GEMM's fp32
    accumulator, never in ``dt``."""
    return torch.cat([weight.to(dt), delta.to(dt)], dim=1)


def _split_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, bias, dt: torch.dtype) -> torch.Tensor:
    xc = x.to(dt)
    return F.linear(torch.cat([xc, xc], dim=-1), _pair(weight, delta, dt), None if bias is None else bias.to(dt))


def _grad_x(g2: torch.Tensor, mats: list[torch.Tensor], x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    # ``∂L/∂x = G Σ mats`` (G: tokens × d_out) in ``dt``; two mats: ``G W`` and ``G ΔW`` (each rounded to ``dt`` by its
    # GEMM), added in fp32, back in x's shape and dtype. When x is in ``dt`` the sum is one in-place ``dt`` add, which
    # CPU/CUDA compute in fp32 and round once: the same bits as the fp32 sum cast to ``dt``, without two fp32
    # tokens × d_in temporaries or a ``[W | ΔW]`` copy (measured ~0.16 s of a bf16 SparseLoRA step on one CPU thread,
    # h5 notes). ``G [W | ΔW]`` as one GEMM gives the same two halves bit for bit; it is only slower here.
    gd = g2.to(dt)
    out = gd @ mats[0].to(dt)
    if len(mats) == 2:
        second = gd @ mats[1].to(dt)
        out = out.add_(second) if x.dtype == dt else out.float().add_(second)
    return out.reshape(x.shape).to(x.dtype)


def _check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r} is not supported (allowed: {GRAD_MODES})")


# ------------------------------------------------------------------------------------------------------- SparseLoRA


def _masked_product(A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor | None, scaling: float) -> torch.Tensor:
    # the scale goes on the d_out×r factor and the mask is one in-place multiply by 0/1 values (``keep``, in A's
    # dtype; None: the mask keeps everything): two passes over d_out×d_in, and a multiply is ~20× faster than
    # masked_fill_ on CPU
    delta = (B * scaling) @ A
    return delta if keep is None else delta.mul_(keep.to(A.dtype))


def _mask_values(
    packed: torch.Tensor, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(keep, dense_rows)``: the mask as 0/1 values (None when it keeps everything) and the rows it keeps whole
    (:func:`kept_rows`). The row check needs the count on the host, so it runs for CPU masks only (on an
    accelerator it would be a device sync per layer and step): there ``dense_rows`` is None."""
    if packed.device.type != "cpu":
        return keep_values(packed, width, dtype), None
    rows = kept_rows(packed, width)
    keep = None if bool(rows.all()) else keep_values(packed, width, dtype)
    return keep, rows


def masked_lora_delta(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """SparsePEFT update (SQFT, arXiv 2410.03750) ``ΔW = M ⊙ s·(B A)`` as a dense tensor (``mask``: True = kept)."""
    return _masked_product(A, B, mask.to(A.dtype), scaling)


def masked_lora_merged(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Merged SparsePEFT weight (SQFT, arXiv 2410.03750) ``W ± ΔW``, computed in (at least) fp32 and cast once to the
    base dtype: where ``W`` and ``ΔW`` are zero the result is exactly zero."""
    dt = _wide(weight.dtype, delta.dtype)
    return torch.add(weight.to(dt), delta.to(dt), alpha=sign).to(weight.dtype)


def masked_lora_weight(
    A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, weight_fn: WeightFn | None, scaling: float
) -> torch.Tensor:
    """``W + M ⊙ s·B A`` (SQFT, arXiv 2410.03750) in (at least) fp32 (``keep``: the mask as 0/1 values in A's dtype,
    None when it keeps everything); with ``weight_fn=None`` only the update ``M ⊙ s·B A`` in A's dtype. Never rounded to a half-precision base dtype:
    the caller decides how to multiply with it."""
    delta = _masked_product(A, B, keep, scaling)
    if weight_fn is None:
        return delta
    weight = weight_fn()
    dt = _wide(A.dtype, weight.dtype)
    return delta.to(dt).add_(weight.to(dt))


class _MaskedLora(torch.autograd.Function):
    """``y = x (W + M ⊙ s·B A)ᵀ + b``; with ``weight_fn=None`` only the branch ``x (M ⊙ s·B A)ᵀ``.

    ``mode``: "branch" (no base), "fused" (one GEMM on ``W + ΔW`` in ≥ fp32), "split" (``[x | x] [W | ΔW]ᵀ``, one
    GEMM in the half-precision compute dtype) or "legacy" (benchmarks only, see ``_LEGACY_ROUNDED_FUSE``).
    """

    @staticmethod
    def forward(ctx, x, bias, A, B, packed, weight_fn, width, scaling, grad_mode):
        cd = compute_dtype(x)
        keep, _ = _mask_values(packed, width, A.dtype)
        if weight_fn is None:
            mode = "branch"
            y = F.linear(x.to(cd), _masked_product(A, B, keep, scaling).to(cd))
        elif _LEGACY_ROUNDED_FUSE:
            mode = "legacy"
            with torch.autocast(device_type=x.device.type, enabled=False):
                w_eff = masked_lora_weight(A, B, keep, weight_fn, scaling)
                cd = weight_fn().dtype
                y = F.linear(x.to(cd), w_eff.to(cd), None if bias is None else bias.to(cd))
        elif _fuses(cd):
            mode = "fused"
            w_eff = masked_lora_weight(A, B, keep, weight_fn, scaling)
            cd = w_eff.dtype
            y = F.linear(x.to(cd), w_eff, None if bias is None else bias.to(cd))
        else:
            mode = "split"
            y = _split_linear(x, weight_fn(), _masked_product(A, B, keep, scaling), bias, cd)
        ctx.save_for_backward(x, A, B, packed)
        ctx.weight_fn, ctx.width, ctx.scaling, ctx.grad_mode = weight_fn, width, scaling, grad_mode
        ctx.mode, ctx.cd = mode, cd
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, packed = ctx.saved_tensors
        s, cd, mode = ctx.scaling, ctx.cd, ctx.mode
        need_x, need_bias, need_A, need_B = ctx.needs_input_grad[:4]
        keep, dense_rows = _mask_values(packed, ctx.width, A.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None
        spare = None  # a d_out×d_in temporary that is dead once grad_x is computed: reused for M ⊙ Gᵀ X
        if need_x:  # the update is recomputed, never stored
            if mode == "split":
                grad_x = _grad_x(g2, [ctx.weight_fn(), _masked_product(A, B, keep, s)], x, cd)
            elif mode == "branch":
                spare = _masked_product(A, B, keep, s)
                grad_x = _grad_x(g2, [spare], x, cd)
            else:  # fused / legacy: ∂L/∂x = G (W + ΔW)
                spare = masked_lora_weight(A, B, keep, ctx.weight_fn, s)
                grad_x = _grad_x(g2, [spare], x, cd)
        if need_A or need_B:
            gemm = A.dtype if mode == "legacy" else cd
            grad_A, grad_B = masked_lora_factor_grads(
                g2, x2, A, B, keep, s, ctx.grad_mode, need_A, need_B, gemm, dense_rows, out=spare
            )
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_A, grad_B, None, None, None, None, None


def kept_rows(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Bool per output row i: ``∀j M_ij = 1`` for the bit-packed mask ``M`` with ``width`` columns. Those rows of the
    SparsePEFT gradient ``M ⊙ Gᵀ X`` (SQFT, arXiv 2410.03750) are plain ``Gᵀ X``, so their factor gradients take
    LoRA's low-rank form (:func:`masked_lora_factor_grads`). One pass over the packed bytes (1/32 of an fp32 weight).
    """
    full, tail = divmod(width, 8)
    rows = packed[..., :full].eq(255).all(-1)
    if tail:
        bits = (1 << tail) - 1
        rows &= packed[..., full].bitwise_and(bits).eq(bits)
    return rows


def _lora_factor_grads(g2, x2, A, B, s, need_A, need_B):
    # ``∂L/∂B = s·Gᵀ (X Aᵀ)``, ``∂L/∂A = s·(G B)ᵀ X`` (A's dtype): O(r·(d_in + d_out)) per token
    grad_B = (g2.t() @ (x2 @ A.t())).mul_(s) if need_B else None
    grad_A = ((g2 @ B).t() @ x2).mul_(s) if need_A else None
    return grad_A, grad_B


def masked_lora_factor_grads(
    g2: torch.Tensor,
    x2: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    grad_mode: str = "exact",
    need_A: bool = True,
    need_B: bool = True,
    gemm_dtype: torch.dtype | None = None,
    dense_rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂A, ∂L/∂B)`` of the SparsePEFT layer ``y = x (W + M ⊙ s·B A)ᵀ`` (SQFT, arXiv 2410.03750) from ``G``
    (tokens×d_out) and ``X`` (tokens×d_in), in A's dtype.

    ``"exact"``: ``D = M ⊙ Gᵀ X`` (∂L/∂ΔW restricted to the mask; the one dense GEMM runs in ``gemm_dtype``, default
    A's dtype), ``∂L/∂B = s·D Aᵀ``, ``∂L/∂A = s·Bᵀ D``. Rows the mask keeps whole (``dense_rows``, see
    :func:`kept_rows`) take the low-rank form ``∂L/∂B_i = s·G_iᵀ (X Aᵀ)``, ``∂L/∂A += s·(G_i B_i)ᵀ X`` — the same
    values without their share of the dense GEMM (a dense layer costs what LoRA's gradients cost). ``out``: an
    optional d_out×d_in buffer of A's dtype for ``D`` (the caller's dead temporary; saves an allocation).
    ``"lors"`` (LoRS, Hu et al., arXiv 2501.08582, ``LorsFn``): mask and scale dropped, ``∂L/∂B = Gᵀ (X Aᵀ)``,
    ``∂L/∂A = (G B)ᵀ X`` — O(r·(d_in + d_out)) per token. ``"lors_scaled"``: the same times s (plain-LoRA
    gradients). ``keep``: the mask as 0/1 values in A's dtype.
    """
    _check_grad_mode(grad_mode)
    dt = A.dtype
    if grad_mode != "exact":
        s = scaling if grad_mode == "lors_scaled" else 1.0
        return _lora_factor_grads(g2.to(dt), x2.to(dt), A, B, s, need_A, need_B)
    n_dense = 0 if dense_rows is None else int(dense_rows.sum())
    if n_dense == g2.shape[-1]:  # the mask keeps everything: LoRA's gradients, exactly
        return _lora_factor_grads(g2.to(dt), x2.to(dt), A, B, scaling, need_A, need_B)
    gd = gemm_dtype or dt
    if n_dense == 0:
        d = _gemm_into(g2.to(gd).t(), x2.to(gd), dt, out).mul_(keep)
        return ((B.t() * scaling) @ d if need_A else None), ((d @ A.t()).mul_(scaling) if need_B else None)
    # some rows whole: the dense GEMM over the other rows only
    sparse = (~dense_rows).nonzero().squeeze(1)
    dense = dense_rows.nonzero().squeeze(1)
    d = (g2.index_select(1, sparse).to(gd).t() @ x2.to(gd)).to(dt).mul_(keep.index_select(0, sparse))
    g2a, x2a = g2.to(dt), x2.to(dt)
    g_dense = g2a.index_select(1, dense)
    grad_A = grad_B = None
    if need_B:
        grad_B = torch.empty_like(B)
        grad_B[sparse] = (d @ A.t()).mul_(scaling)
        grad_B[dense] = (g_dense.t() @ (x2a @ A.t())).mul_(scaling)
    if need_A:
        grad_A = (B.index_select(0, sparse).t() @ d).add_((g_dense @ B.index_select(0, dense)).t() @ x2a)
        grad_A.mul_(scaling)
    return grad_A, grad_B


def _gemm_into(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` in ``dt``; into ``out`` (no allocation) when the GEMM already runs in ``dt`` and ``out`` fits."""
    if out is not None and a.dtype == dt and out.dtype == dt and out.shape == (a.shape[0], b.shape[1]):
        return torch.mm(a, b, out=out)
    return (a @ b).to(dt)


def masked_lora(
    x: torch.Tensor,
    weight_fn: WeightFn | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    packed_mask: torch.Tensor,
    in_features: int,
    scaling: float,
    grad_mode: str = "exact",
) -> torch.Tensor:
    """Base + SparsePEFT update (SQFT, arXiv 2410.03750): ``y = x (W + M ⊙ s·B A)ᵀ + b`` in the compute dtype.

    ``weight_fn()`` returns the frozen base weight ``W``; with ``weight_fn=None`` (and ``bias=None``) only the branch
    ``x (M ⊙ s·B A)ᵀ``, added to a base output computed elsewhere. ``packed_mask``: ``M`` bit-packed
    (:func:`~prune_peft.sparsity.packing.pack_mask`) with ``in_features`` columns. ``grad_mode``: see
    :func:`masked_lora_factor_grads`. Fp32/fp64 compute: one GEMM on ``W + ΔW``; fp16/bf16: ``[x | x] [W | ΔW]ᵀ``.
    """
    _check_grad_mode(grad_mode)
    return _MaskedLora.apply(x, bias, A, B, packed_mask, weight_fn, in_features, scaling, grad_mode)


# -------------------------------------------------------------------------------------------------------------- SPP


def _even(row_block: torch.Tensor, blocks: int) -> int:
    """Rows per block when all R blocks are equal (then views replace gathers), else 0."""
    rows = row_block.numel()
    return rows // blocks if rows % blocks == 0 else 0


def spp_scale(W_row: torch.Tensor, w_col: torch.Tensor, row_block: torch.Tensor, scaling: float) -> torch.Tensor:
    """SPP's scale (Lu et al., arXiv 2405.16057) ``S = s·Rep(W_row) ⊙ w_col 1ᵀ`` (d_out×d_in); ``row_block[i]`` is
    the block of output row i."""
    blocks, width = W_row.shape
    n = _even(row_block, blocks)
    col = w_col.reshape(-1) * scaling
    if n:
        return (W_row.unsqueeze(1) * col.view(blocks, n, 1)).view(-1, width)
    return W_row.index_select(0, row_block) * col.unsqueeze(1)


def spp_delta(
    weight: torch.Tensor, W_row: torch.Tensor, w_col: torch.Tensor, row_block: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SPP update (Lu et al., arXiv 2405.16057) ``ΔW = S ⊙ W = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W`` as a dense tensor in
    the adapter dtype."""
    return spp_scale(W_row, w_col, row_block, scaling).mul_(weight.to(W_row.dtype))


def spp_merged(
    current: torch.Tensor,
    base: torch.Tensor,
    W_row: torch.Tensor,
    w_col: torch.Tensor,
    row_block: torch.Tensor,
    scaling: float,
    sign: float = 1.0,
) -> torch.Tensor:
    """Merged SPP weight (Lu et al., arXiv 2405.16057) ``current ± S ⊙ base``, one fused multiply-add over d_out×d_in
    in (at least) fp32, cast once to ``current``'s dtype (zeros of ``current`` and ``base`` stay exactly zero)."""
    scale = spp_scale(W_row, w_col, row_block, scaling)
    dt = _wide(scale.dtype, current.dtype)
    return torch.addcmul(current.to(dt), base.to(dt), scale.to(dt), value=sign).to(current.dtype)


def _spp_weight_eff(weight, W_row, w_col, row_block, s) -> torch.Tensor:
    """``W + S ⊙ W`` in (at least) fp32 — the fused forward's weight."""
    scale = spp_scale(W_row, w_col, row_block, s)
    dt = _wide(scale.dtype, weight.dtype)
    w = weight.to(dt)
    return torch.addcmul(w, w, scale.to(dt))


def _spp_grads(e, W_row, w_col, row_block, s, need_row, need_col):
    """Adapter gradients from ``E = ∂L/∂S = (Gᵀ X) ⊙ W`` (d_out×d_in), via batched mat-vecs (no new d²)."""
    blocks, width = W_row.shape
    n = _even(row_block, blocks)
    col = w_col.reshape(-1)
    grad_row = grad_col = None
    if n:
        ev = e.view(blocks, n, width)
        if need_row:
            grad_row = torch.bmm(col.view(blocks, 1, n), ev).view(blocks, width).mul_(s)
        if need_col:
            grad_col = torch.bmm(ev, W_row.unsqueeze(-1)).reshape(w_col.shape).mul_(s)
        return grad_row, grad_col
    if need_row:
        grad_row = torch.zeros_like(W_row).index_add_(0, row_block, e * col.unsqueeze(1)).mul_(s)
    if need_col:
        grad_col = (e * W_row.index_select(0, row_block)).sum(1).mul_(s).reshape(w_col.shape)
    return grad_row, grad_col


class _SPPFused(torch.autograd.Function):
    """``y = x (W + ΔW)ᵀ + b`` (``with_base``) or ``x ΔWᵀ``, building the d_out×d_in update transiently.

    Modes as in :class:`_MaskedLora`: "branch", "fused" (≥ fp32), "split" (half precision) or "legacy".
    """

    @staticmethod
    def forward(ctx, x, bias, W_row, w_col, weight_fn, row_block, scaling, with_base):
        cd = compute_dtype(x)
        weight = weight_fn()
        if not with_base:
            mode = "branch"
            y = F.linear(x.to(cd), spp_delta(weight, W_row, w_col, row_block, scaling).to(cd))
        elif _LEGACY_ROUNDED_FUSE:
            mode = "legacy"
            with torch.autocast(device_type=x.device.type, enabled=False):
                cd = weight.dtype
                w_eff = spp_merged(weight, weight, W_row, w_col, row_block, scaling)
                y = F.linear(x.to(cd), w_eff, None if bias is None else bias.to(cd))
        elif _fuses(cd):
            mode = "fused"
            w_eff = _spp_weight_eff(weight, W_row, w_col, row_block, scaling)
            cd = w_eff.dtype
            y = F.linear(x.to(cd), w_eff, None if bias is None else bias.to(cd))
        else:
            mode = "split"
            y = _split_linear(x, weight, spp_delta(weight, W_row, w_col, row_block, scaling), bias, cd)
        ctx.save_for_backward(x, W_row, w_col, row_block)
        ctx.weight_fn, ctx.scaling, ctx.mode, ctx.cd = weight_fn, scaling, mode, cd
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, W_row, w_col, row_block = ctx.saved_tensors
        s, cd, mode = ctx.scaling, ctx.cd, ctx.mode
        need_x, need_bias, need_row, need_col = ctx.needs_input_grad[:4]
        weight = ctx.weight_fn()
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_row = grad_col = None
        if need_x:
            if mode == "split":
                grad_x = _grad_x(g2, [weight, spp_delta(weight, W_row, w_col, row_block, s)], x, cd)
            elif mode == "branch":
                grad_x = _grad_x(g2, [spp_delta(weight, W_row, w_col, row_block, s)], x, cd)
            elif mode == "legacy":
                grad_x = _grad_x(g2, [spp_merged(weight, weight, W_row, w_col, row_block, s)], x, cd)
            else:
                grad_x = _grad_x(g2, [_spp_weight_eff(weight, W_row, w_col, row_block, s)], x, cd)
        if need_row or need_col:
            dt = W_row.dtype
            gd = dt if mode == "legacy" else cd
            e = (g2.to(gd).t() @ x2.to(gd)).to(dt).mul_(weight.to(dt))
            grad_row, grad_col = _spp_grads(e, W_row, w_col, row_block, s, need_row, need_col)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_row, grad_col, None, None, None, None


class _SPPBlockwise(torch.autograd.Function):
    """The SPP branch ``x ΔWᵀ`` one row block at a time (SPP's memory-optimised form), in the compute dtype.

    Block k computes ``s · ((x ⊙ W_row[k]) W_kᵀ) ⊙ w_col[k]`` with ``W_k`` the k-th block of output rows, so neither
    ``Rep(W_row) ⊙ W`` nor any other d_out×d_in tensor is ever formed; the largest temporary is one
    tokens×d_in activation. Backward recomputes the per-block products instead of saving them; the factor
    gradients are reduced in (at least) fp32.
    """

    @staticmethod
    def forward(ctx, x, W_row, w_col, weight_fn, bounds, scaling):
        cd = compute_dtype(x)
        weight = weight_fn()
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        for k, (r0, r1) in enumerate(bounds):
            out[:, r0:r1] = (x2 * W_row[k].to(cd)) @ weight[r0:r1].to(cd).t()
        out.mul_((w_col.reshape(1, -1) * scaling).to(cd))
        ctx.save_for_backward(x, W_row, w_col)
        ctx.weight_fn, ctx.bounds, ctx.scaling, ctx.cd = weight_fn, bounds, scaling, cd
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, W_row, w_col = ctx.saved_tensors
        s, cd = ctx.scaling, ctx.cd
        need_x, need_row, need_col = ctx.needs_input_grad[:3]
        weight = ctx.weight_fn()
        acc = _wide(W_row.dtype, cd)
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
        col = w_col.reshape(-1)
        grad_x = torch.zeros(x2.shape, dtype=acc, device=x2.device) if need_x else None
        grad_row = torch.zeros_like(W_row) if need_row else None
        grad_col = torch.zeros_like(w_col).reshape(-1) if need_col else None
        for k, (r0, r1) in enumerate(ctx.bounds):
            w_k = weight[r0:r1].to(cd)
            g_k = g2[:, r0:r1]
            if need_x or need_row:
                p_k = ((g_k * (col[r0:r1] * s).to(cd)) @ w_k).to(acc)  # tokens × d_in
                if need_x:
                    grad_x.addcmul_(p_k, W_row[k].to(acc).expand_as(p_k))
                if need_row:
                    grad_row[k] = (p_k * x2.to(acc)).sum(0).to(W_row.dtype)
                del p_k
            if need_col:
                q_k = ((x2 * W_row[k].to(cd)) @ w_k.t()).to(acc)  # recomputed forward product, tokens × block
                grad_col[r0:r1] = ((g_k.to(acc) * q_k).sum(0) * s).to(w_col.dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if grad_col is not None:
            grad_col = grad_col.reshape(w_col.shape)
        return grad_x, grad_row, grad_col, None, None, None


def spp(
    x: torch.Tensor,
    weight_fn: WeightFn,
    bias: torch.Tensor | None,
    W_row: torch.Tensor,
    w_col: torch.Tensor,
    row_block: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Base + SPP update (Lu et al., arXiv 2405.16057): ``y = x (W + s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W)ᵀ + b`` in the
    compute dtype (fp32/fp64: one GEMM on ``W + ΔW``; fp16/bf16: ``[x | x] [W | ΔW]ᵀ``)."""
    return _SPPFused.apply(x, bias, W_row, w_col, weight_fn, row_block, scaling, True)


def spp_branch(
    x: torch.Tensor,
    weight_fn: WeightFn,
    W_row: torch.Tensor,
    w_col: torch.Tensor,
    row_block: torch.Tensor,
    bounds: list[tuple[int, int]],
    scaling: float,
    blockwise: bool,
) -> torch.Tensor:
    """The SPP branch ``x ΔWᵀ`` alone (Lu et al., arXiv 2405.16057; ``ΔW`` as in :func:`spp_delta`) in the compute
    dtype: blockwise (low memory, block k is ``s·((x ⊙ W_row[k]) W_kᵀ) ⊙ w_col[k]``) or through the transient dense
    update."""
    if blockwise:
        return _SPPBlockwise.apply(x, W_row, w_col, weight_fn, bounds, scaling)
    return _SPPFused.apply(x, None, W_row, w_col, weight_fn, row_block, scaling, False)
