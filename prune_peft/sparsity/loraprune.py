"""LoRA-guided importance (LoRAPrune; Zhang et al., ACL Findings 2024, arXiv 2305.18403) — pure tensor code.

A frozen weight W ∈ R^{d_out×d_in} with a LoRA update s·B A (A ∈ R^{r×d_in}, B ∈ R^{d_out×r}) has no gradient of
its own; LoRAPrune *estimates* it from the LoRA gradients G_A = ∂L/∂A, G_B = ∂L/∂B:

    Ĝ = G_B·A + B·G_A − G_B·G_A        (= −(B'A' − BA) after one SGD step of size 1: B' = B − G_B, A' = A − G_A)

(the LoRA scaling s is *not* applied to Ĝ, as in the reference), and scores every weight by the first-order Taylor
estimate of removing the *merged* weight:

    I = |Ĝ ⊙ (W + s·B A)|.

Structured scores sum I over the dimension a group does not remove: over inputs for output channels (rows of
q/k/v/gate/up), over outputs for input channels (columns of o_proj/down_proj). Each module's group-score vector is
L2-normalised, the vectors of one block are summed, and an exponential moving average over optimizer steps,
Ī ← β·Ī + (1 − β)·I (β = 0.9, Ī = 0 before the first step), smooths them. The ``n`` lowest-scoring groups are pruned; pruned groups stay pruned.

Everything here works on plain tensors; nothing knows about peft or transformers.
"""

from __future__ import annotations

import math

import torch

from .masks import keep_top

__all__ = [
    "channel_scores",
    "estimate_weight_grad",
    "grad_importance",
    "lora_importance",
    "moving_average",
    "n_pruned",
    "normalize_scores",
    "prune_lowest",
]


def estimate_weight_grad(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor) -> torch.Tensor:
    """LoRAPrune's estimate of ∂L/∂W (arXiv 2305.18403): Ĝ = G_B·A + B·G_A − G_B·G_A, computed as one rank-2r product
    ``[G_B, B] @ [A − G_A; G_A]`` in float32."""
    A, B, gA, gB = (t.detach().float() for t in (A, B, grad_A, grad_B))
    return torch.cat([gB, B], dim=1) @ torch.cat([A - gA, gA], dim=0)


def lora_importance(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Element-wise LoRAPrune importance (arXiv 2305.18403) I = |Ĝ ⊙ (W + s·B A)| (float32, shape of W)."""
    merged = torch.addmm(weight.detach().float(), B.detach().float(), A.detach().float(), alpha=scaling)
    return estimate_weight_grad(A, B, grad_A, grad_B).mul_(merged).abs_()


def channel_scores(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    grad_A: torch.Tensor | None = None,
    grad_B: torch.Tensor | None = None,
    grad_W: torch.Tensor | None = None,
    axis: str = "out",
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-channel sums of the element importance, ``Σ_j I_ij`` (``axis="out"``) or ``Σ_i I_ij`` (``axis="in"``), as
    LoRAPrune scores its structured groups (arXiv 2305.18403).

    The score is :func:`lora_importance` when LoRA gradients are given, :func:`grad_importance` when the base gradient
    ``grad_W`` is given, else the magnitude ``|W + s·B A|``. The whole layer is one fused pass of a handful of ops
    (``Ĝ = [G_B, B]·[A − G_A; G_A]``, ``W + s·BA``, their product, its 1-norm along the summed dim) when it has at
    most 4 Mi elements; larger
    layers go ``chunk`` rows at a time (default: 4 Mi elements' worth), which bounds the float32 temporaries at
    2 × 16 MiB whatever the model size.

    ``weight``, ``B`` and ``grad_B`` may be any block of rows of the layer (the rows one rank holds under FSDP2) with
    the whole ``A`` / ``grad_A``: ``"out"`` then gives those rows' scores and ``"in"`` their partial column sums.
    """
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' (rows) or 'in' (columns), got {axis!r}")
    A32, B32 = A.detach().float(), B.detach().float()
    lora = grad_A is not None and grad_B is not None
    if lora:
        gA = grad_A.detach().float()
        rhs = torch.cat([A32 - gA, gA], dim=0)  # [2r, d_in]
        lhs = torch.cat([grad_B.detach().float(), B32], dim=1)  # [d_out, 2r]
    d_out, d_in = weight.shape
    if chunk is None:
        chunk = d_out if d_out * d_in <= _FUSED_ELEMENTS else max(1, _FUSED_ELEMENTS // d_in)

    W = weight.detach()
    gW = grad_W.detach() if grad_W is not None else None

    def block(r0: int, r1: int) -> torch.Tensor:
        """Signed Ĝ ⊙ (W + s·BA) of rows [r0, r1) (the |·| is taken inside the 1-norm reduction: one pass less)."""

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if (r0, r1) == (0, d_out) else t[r0:r1]  # whole layer: no slicing ops

        merged = torch.addmm(rows(W).float(), rows(B32), A32, alpha=scaling)
        if lora:
            return torch.mm(rows(lhs), rhs).mul_(merged)
        if gW is not None:
            return merged.mul_(rows(gW).float())
        return merged

    def l1(t: torch.Tensor, dim: int) -> torch.Tensor:  # Σ |t| along dim, abs fused into the reduction
        return torch.linalg.vector_norm(t, ord=1, dim=dim)

    if chunk >= d_out:
        return l1(block(0, d_out), 1 if axis == "out" else 0)
    if axis == "out":
        return torch.cat([l1(block(r0, min(d_out, r0 + chunk)), 1) for r0 in range(0, d_out, chunk)])
    cols = torch.zeros(d_in, dtype=torch.float32, device=weight.device)
    for r0 in range(0, d_out, chunk):
        cols += l1(block(r0, min(d_out, r0 + chunk)), 0)
    return cols


_FUSED_ELEMENTS = 1 << 22  # layers up to this size are scored in one pass (float32 temporaries ≤ 16 MiB each)


def normalize_scores(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """s / (‖s‖₂ + ε) (LoRAPrune, arXiv 2305.18403) — makes modules of different sizes and gradient scales comparable before summing."""
    return scores / (scores.norm(p=2) + eps)


def moving_average(old: torch.Tensor | None, new: torch.Tensor, beta: float) -> torch.Tensor:
    """Ī ← β·Ī + (1 − β)·I with Ī starting at zero (LoRAPrune, arXiv 2305.18403; reference ``update_sensitivity_dict``).

    ``old=None`` is the all-zero start, so the first observation enters with weight ``1 − β`` (0.1 at β = 0.9), as in
    the reference. Skipping non-finite updates is the caller's decision (the reference skips a step's update of every
    block when any score is NaN; see ``LoRAPruner.update_importance``).
    """
    if old is None:
        return new.float().mul(1.0 - beta)
    return old.mul(beta).add_(new, alpha=1.0 - beta)


def n_pruned(sparsity: float, groups: int) -> int:
    """Groups removed at ``sparsity`` p of n groups (LoRAPrune, arXiv 2305.18403): the nearest integer, halves rounded up (⌊p·n + ½⌋, with float slack).

    The reference floors and fires its last event only while p(t) < p_final, so it can stop one group short;
    rounding to nearest at the final p gives the count closest to the target.
    """
    return min(groups, math.floor(sparsity * groups + 0.5 + 1e-9))


def prune_lowest(scores: torch.Tensor, mask: torch.Tensor, n_prune: int) -> torch.Tensor:
    """New keep-mask with the ``n_prune`` lowest-scoring groups removed; already-removed groups stay removed:
    ``M' = keep_top(where(M, s, −∞), G − n_prune) ∧ M`` (LoRAPrune's iterative group pruning, arXiv 2305.18403).

    Pruned groups score −inf, so the mask only ever shrinks. Ties keep the lower index (stable sort), which makes the
    decision deterministic across runs and ranks. Works along the last dim (1-D vectors or batched rows).
    """
    if n_prune < 0 or n_prune > scores.shape[-1]:
        raise ValueError(f"n_prune must be in [0, {scores.shape[-1]}], got {n_prune}")
    s = torch.where(mask.to(scores.device), scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    keep = keep_top(s, scores.shape[-1] - n_prune)
    return (keep & mask.to(keep.device)).to(mask.device)


def grad_importance(
    weight: torch.Tensor,
    grad: torch.Tensor,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 0.0,
) -> torch.Tensor:
    """Element importance from the true base gradient, I = |∂L/∂W ⊙ (W + s·B A)| (float32).

    LoRAPrune's ``prune_metric="grad"`` (arXiv 2305.18403, reference ``compute_sensitivity``): the same first-order
    Taylor score as :func:`lora_importance`, with the real ∂L/∂W in place of the estimate Ĝ and the *merged* weight
    W + s·BA as the weight being removed.
    """
    merged = weight.detach().float()
    if A is not None and B is not None:
        merged = torch.addmm(merged, B.detach().float(), A.detach().float(), alpha=scaling)
    return grad.detach().float().mul(merged).abs_()
