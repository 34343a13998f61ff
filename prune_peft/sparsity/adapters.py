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
additionally offers LoRS's "graph rearrangement" (``exact=False``): the factor gradients are the plain-LoRA ones (mask
dropped), which saves the one extra dense ``Gᵀ X`` product per layer.

When the base weight is available as a float tensor the update is fused into the base matmul (``y = x (W + ΔW)ᵀ + b``):
one matmul in forward and one for the input gradient, and exactly what the merged model computes — merges use the
same helpers (:func:`masked_lora_merged`, :func:`spp_merged`), so merged and unmerged outputs agree to the last bit
in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .packing import keep_values

__all__ = [
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


def _linear(x: torch.Tensor, w_eff: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # ``y = x W_effᵀ + b`` in the merged weight's dtype, so the update is never rounded to the base dtype first
    return F.linear(x.to(w_eff.dtype), w_eff, None if bias is None else bias.to(w_eff.dtype))


def _input_grad(g2: torch.Tensor, w_eff: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # ``∂L/∂x = G W_eff`` (G: tokens × d_out), back in x's shape and dtype
    return (g2.to(w_eff.dtype) @ w_eff).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------------------------------- SparseLoRA


def _masked_product(A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, scaling: float) -> torch.Tensor:
    # the scale goes on the d_out×r factor and the mask is one in-place multiply by 0/1 values (``keep``, in A's
    # dtype): two passes over d_out×d_in, and a multiply is ~20× faster than masked_fill_ on CPU
    return ((B * scaling) @ A).mul_(keep)


def masked_lora_delta(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """SparsePEFT update (SQFT, arXiv 2410.03750) ``ΔW = M ⊙ s·(B A)`` as a dense tensor (``mask``: True = kept)."""
    return _masked_product(A, B, mask.to(A.dtype), scaling)


def masked_lora_merged(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Merged SparsePEFT weight (SQFT, arXiv 2410.03750) ``W ± ΔW``, computed in the update's dtype and cast to the
    base dtype — the fused forward's weight, so merged and unmerged outputs agree bitwise."""
    if sign < 0:
        delta = -delta
    return delta.add(weight).to(weight.dtype)


def masked_lora_weight(
    A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, weight_fn: WeightFn | None, scaling: float
) -> torch.Tensor:
    """The fused forward's weight ``W + M ⊙ s·B A`` (SQFT, arXiv 2410.03750) in the base dtype (``keep``: the mask as 0/1 values in A's
    dtype); with ``weight_fn=None`` only the update ``M ⊙ s·B A``."""
    delta = _masked_product(A, B, keep, scaling)
    if weight_fn is None:
        return delta
    weight = weight_fn()
    return delta.add_(weight).to(weight.dtype)  # == masked_lora_merged(weight, delta)


class _MaskedLora(torch.autograd.Function):
    """``y = x (W + M ⊙ s·B A)ᵀ + b``; with ``weight_fn=None`` only the branch ``x (M ⊙ s·B A)ᵀ``."""

    @staticmethod
    def forward(ctx, x, bias, A, B, packed, weight_fn, width, scaling, exact):
        with torch.autocast(device_type=x.device.type, enabled=False):
            w_eff = masked_lora_weight(A, B, keep_values(packed, width, A.dtype), weight_fn, scaling)
            y = _linear(x, w_eff, bias)
        ctx.save_for_backward(x, A, B, packed)
        ctx.weight_fn, ctx.width, ctx.scaling, ctx.exact = weight_fn, width, scaling, exact
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, packed = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_bias, need_A, need_B = ctx.needs_input_grad[:4]
        keep = keep_values(packed, ctx.width, A.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            w_eff = masked_lora_weight(A, B, keep, ctx.weight_fn, s)  # recomputed, never stored
            grad_x = _input_grad(g2, w_eff, x)
            del w_eff
        if need_A or need_B:
            grad_A, grad_B = masked_lora_factor_grads(g2, x2, A, B, keep, s, ctx.exact, need_A, need_B)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_A, grad_B, None, None, None, None, None


def masked_lora_factor_grads(
    g2: torch.Tensor,
    x2: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    exact: bool,
    need_A: bool = True,
    need_B: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂A, ∂L/∂B)`` of the SparsePEFT layer ``y = x (W + M ⊙ s·B A)ᵀ`` (SQFT, arXiv 2410.03750) from ``G`` (tokens×d_out) and ``X`` (tokens×d_in).

    exact: ``D = M ⊙ Gᵀ X`` (∂L/∂ΔW restricted to the mask), ``∂L/∂B = s·D Aᵀ``, ``∂L/∂A = s·Bᵀ D``.
    LoRS (Hu et al., arXiv 2501.08582): the mask is dropped, ``∂L/∂B = s·Gᵀ (X Aᵀ)``, ``∂L/∂A = s·(G B)ᵀ X`` —
    plain-LoRA gradients, O(r·(d_in + d_out)) per token. ``keep``: the mask as 0/1 values in A's dtype.
    """
    g2a, x2a = g2.to(A.dtype), x2.to(A.dtype)
    if exact:
        d = (g2a.t() @ x2a).mul_(keep)
        return ((B.t() * scaling) @ d if need_A else None), ((d @ A.t()).mul_(scaling) if need_B else None)
    grad_B = (g2a.t() @ (x2a @ A.t())).mul_(scaling) if need_B else None
    grad_A = ((g2a @ B).t() @ x2a).mul_(scaling) if need_A else None
    return grad_A, grad_B


def masked_lora(
    x: torch.Tensor,
    weight_fn: WeightFn | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    packed_mask: torch.Tensor,
    in_features: int,
    scaling: float,
    exact: bool = True,
) -> torch.Tensor:
    """Fused base + SparsePEFT update (SQFT, arXiv 2410.03750): ``y = x (W + M ⊙ s·B A)ᵀ + b``.

    ``weight_fn()`` returns the frozen base weight ``W``; with ``weight_fn=None`` (and ``bias=None``) only the branch
    ``x (M ⊙ s·B A)ᵀ``, added to a base output computed elsewhere. ``packed_mask``: ``M`` bit-packed
    (:func:`~prune_peft.sparsity.packing.pack_mask`) with ``in_features`` columns. ``exact=False``: LoRS's
    mask-free factor gradients (arXiv 2501.08582, see :func:`masked_lora_factor_grads`).
    """
    return _MaskedLora.apply(x, bias, A, B, packed_mask, weight_fn, in_features, scaling, exact)


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
    """Merged SPP weight (Lu et al., arXiv 2405.16057) ``current ± S ⊙ base`` in the adapter dtype, cast to ``current``'s dtype — the fused forward's weight when
    ``current is base`` (one fused multiply-add over d_out×d_in)."""
    scale = spp_scale(W_row, w_col, row_block, scaling)
    dt = scale.dtype
    return torch.addcmul(current.to(dt), base.to(dt), scale, value=sign).to(current.dtype)


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
    """``y = x (W + ΔW)ᵀ + b`` (``with_base``) or ``x ΔWᵀ``, building the d_out×d_in update transiently."""

    @staticmethod
    def _weight(weight, W_row, w_col, row_block, s, with_base):
        if with_base:
            return spp_merged(weight, weight, W_row, w_col, row_block, s)
        return spp_delta(weight, W_row, w_col, row_block, s)

    @staticmethod
    def forward(ctx, x, bias, W_row, w_col, weight_fn, row_block, scaling, with_base):
        with torch.autocast(device_type=x.device.type, enabled=False):
            w_eff = _SPPFused._weight(weight_fn(), W_row, w_col, row_block, scaling, with_base)
            y = _linear(x, w_eff, bias)
        ctx.save_for_backward(x, W_row, w_col, row_block)
        ctx.weight_fn, ctx.scaling, ctx.with_base = weight_fn, scaling, with_base
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, W_row, w_col, row_block = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_bias, need_row, need_col = ctx.needs_input_grad[:4]
        weight = ctx.weight_fn()
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_row = grad_col = None
        if need_x:
            w_eff = _SPPFused._weight(weight, W_row, w_col, row_block, s, ctx.with_base)
            grad_x = _input_grad(g2, w_eff, x)
            del w_eff
        if need_row or need_col:
            dt = W_row.dtype
            e = (g2.to(dt).t() @ x2.to(dt)).mul_(weight.to(dt))
            grad_row, grad_col = _spp_grads(e, W_row, w_col, row_block, s, need_row, need_col)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, grad_row, grad_col, None, None, None, None


class _SPPBlockwise(torch.autograd.Function):
    """The SPP branch ``x ΔWᵀ`` one row block at a time (SPP's memory-optimised form).

    Block k computes ``s · ((x ⊙ W_row[k]) W_kᵀ) ⊙ w_col[k]`` with ``W_k`` the k-th block of output rows, so neither
    ``Rep(W_row) ⊙ W`` nor any other d_out×d_in tensor is ever formed; the largest temporary is one
    tokens×d_in activation. Backward recomputes the per-block products instead of saving them.
    """

    @staticmethod
    def forward(ctx, x, W_row, w_col, weight_fn, bounds, scaling):
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = weight_fn()
            x2 = x.reshape(-1, x.shape[-1]).to(W_row.dtype)
            out = x2.new_empty(x2.shape[0], weight.shape[0])
            for k, (r0, r1) in enumerate(bounds):
                out[:, r0:r1] = (x2 * W_row[k]) @ weight[r0:r1].to(W_row.dtype).t()
            out.mul_(w_col.reshape(1, -1) * scaling)
        ctx.save_for_backward(x, W_row, w_col)
        ctx.weight_fn, ctx.bounds, ctx.scaling = weight_fn, bounds, scaling
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, W_row, w_col = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_row, need_col = ctx.needs_input_grad[:3]
        weight = ctx.weight_fn()
        dt = W_row.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
        grad_x = torch.zeros_like(x2) if need_x else None
        grad_row = torch.zeros_like(W_row) if need_row else None
        grad_col = torch.zeros_like(w_col).reshape(-1) if need_col else None
        for k, (r0, r1) in enumerate(ctx.bounds):
            w_k = weight[r0:r1].to(dt)
            g_k = g2[:, r0:r1]
            if need_x or need_row:
                p_k = (g_k * (w_col.reshape(-1)[r0:r1] * s)) @ w_k  # tokens × d_in
                if need_x:
                    grad_x.addcmul_(p_k, W_row[k].expand_as(p_k))
                if need_row:
                    grad_row[k] = (p_k * x2).sum(0)
                del p_k
            if need_col:
                q_k = (x2 * W_row[k]) @ w_k.t()  # recomputed forward product, tokens × block
                grad_col[r0:r1] = (g_k * q_k).sum(0) * s
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
    """Fused base + SPP update (Lu et al., arXiv 2405.16057): ``y = x (W + s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W)ᵀ + b``."""
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
    """The SPP branch ``x ΔWᵀ`` alone (Lu et al., arXiv 2405.16057; ``ΔW`` as in :func:`spp_delta`): blockwise (low
    memory, block k is ``s·((x ⊙ W_row[k]) W_kᵀ) ⊙ w_col[k]``) or through the transient dense update."""
    if blockwise:
        return _SPPBlockwise.apply(x, W_row, w_col, weight_fn, bounds, scaling)
    return _SPPFused.apply(x, None, W_row, w_col, weight_fn, row_block, scaling, False)
