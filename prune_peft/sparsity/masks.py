"""Sparsity masks: unstructured, N:M and structured groups, plus validators and statistics.

Pure tensor code, no Hugging Face imports (torch only). Every mask is boolean with ``True = kept``.
Scores follow the convention "higher = more important"; pruning removes the lowest scores.
Ties are broken deterministically: among equal scores the element with the *lower* index is kept
(stable sorting), so masks are reproducible across runs and ranks.

Pattern convention: ``"N:M"`` keeps at most N non-zeros in every M consecutive weights along the
input dimension (NVIDIA's convention: "2:4" = 2 of every 4 kept, "1:4" = 75 % sparse).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "NMPattern",
    "describe_pattern",
    "global_masks",
    "gqa_unit_scores",
    "group_mask",
    "is_nm_sparse",
    "keep_top",
    "keep_top_per_row",
    "mask_mismatch",
    "nm_mask",
    "nm_violations",
    "parse_pattern",
    "top2of4_mask",
    "unstructured_mask",
    "validate_sparsity",
]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """N non-zeros kept in every M consecutive elements of the last dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | NMPattern | None, *, arg: str = "pattern") -> NMPattern | None:
    """Parse ``"unstructured"`` / ``None`` (→ ``None``) or ``"N:M"`` with ``0 < N < M`` (→ :class:`NMPattern`;
    N kept of every M, sparsity ``1 − N/M``, arXiv 2104.08378)."""
    if pattern is None or isinstance(pattern, NMPattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"{arg} must be 'unstructured' or a string 'N:M' (e.g. '2:4'), got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return None
    match = _NM_RE.match(pattern)
    if not match:
        raise ValueError(
            f"{arg} must be 'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"{arg}={pattern!r} is impossible: 'N:M' keeps N of every M weights and needs 0 < N < M "
            f"(allowed e.g. '2:4', '4:8', '1:4')"
        )
    return NMPattern(n, m)


def validate_sparsity(value: float, *, arg: str = "sparsity") -> float:
    """Sparsity ``p = #pruned / #weights`` is the pruned fraction; it must lie in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{arg} must be in [0, 1) (fraction of weights removed), got {value!r}")
    return float(value)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``n_keep`` highest scores along the last dim; ties keep the lower index.

    ``M_i = [rank(s_i) < n_keep]`` with the rank of a stable descending sort — the selection rule shared by
    magnitude pruning (Han et al., 2015, arXiv 1506.02626), Wanda (arXiv 2306.11695) and structured pruning.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        mask.scatter_(-1, order[..., :n_keep], True)
    return mask


def keep_top_per_row(scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """:func:`keep_top` with a count per row: ``M_ri = [rank_r(s_ri) < k_r]`` for the stable descending sort of row
    r, ties keeping the lower index (so a constant ``n_keep`` gives ``keep_top``'s mask). ``n_keep`` has shape
    ``scores.shape[:-1]``; used by OWL's integer per-row counts (Yin et al., arXiv 2310.05175) with Wanda's
    per-output groups (arXiv 2306.11695)."""
    n_keep = torch.as_tensor(n_keep, device=scores.device)
    cols = scores.shape[-1]
    if n_keep.shape != scores.shape[:-1] or n_keep.is_floating_point() or (n_keep < 0).any() or (n_keep > cols).any():
        raise ValueError(
            f"n_keep must be integers in [0, {cols}] of shape {tuple(scores.shape[:-1])} (one per row), got "
            f"shape {tuple(n_keep.shape)}"
        )
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    kept_rank = torch.arange(cols, device=scores.device) < n_keep.unsqueeze(-1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, kept_rank)


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Prune the ``int(sparsity · count)`` lowest scores per comparison group: ``M = keep_top(S, count − ⌊p·count⌋)``.

    ``scope="row"``: each output row is its own group (Wanda's per-output comparison, arXiv 2306.11695);
    ``scope="layer"``: the whole tensor is one group (classic magnitude pruning, Han et al., arXiv 1506.02626).
    """
    validate_sparsity(sparsity)
    if scope == "row":
        flat = scores.reshape(-1, scores.shape[-1])
    elif scope == "layer":
        flat = scores.reshape(1, -1)
    else:
        raise ValueError(f"scope must be one of 'row', 'layer' (or 'global' through global_masks), got {scope!r}")
    n_prune = int(sparsity * flat.shape[-1])
    return keep_top(flat, flat.shape[-1] - n_prune).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every M consecutive elements of the last dimension (N:M sparsity, NVIDIA's 2:4:
    Mishra et al., 2021, arXiv 2104.08378): ``M_g = keep_top(S_g, N)`` for each group ``g`` of M."""
    pattern = parse_pattern(f"{n}:{m}")
    assert pattern is not None
    if scores.shape[-1] % m:
        raise ValueError(
            f"pattern '{n}:{m}' needs the last dimension to be divisible by {m}, got shape {tuple(scores.shape)}"
        )
    groups = scores.reshape(-1, m)
    return keep_top(groups, n).reshape(scores.shape)


def top2of4_mask(scores: torch.Tensor) -> torch.Tensor:
    """2:4 mask (Mishra et al., 2021, arXiv 2104.08378): the 2 highest of every 4 scores along the last dim.

    Branch-free pairwise ranks, ``r_i = #{j < i : s_j ≥ s_i} + #{j > i : s_j > s_i}``, keep ``r_i < 2`` — the rank
    of a stable descending sort, so (for scores without NaN) it equals ``nm_mask(scores, 2, 4)``; it is the formula
    the Triton 2:4 kernel evaluates, so this is also that kernel's torch twin. Compares in ``scores``' own dtype.
    """
    if scores.shape[-1] % 4:
        raise ValueError(f"2:4 needs the last dimension divisible by 4, got shape {tuple(scores.shape)}")
    a0, a1, a2, a3 = scores.reshape(-1, 4).unbind(-1)
    r0 = (a1 > a0).int() + (a2 > a0).int() + (a3 > a0).int()
    r1 = (a0 >= a1).int() + (a2 > a1).int() + (a3 > a1).int()
    r2 = (a0 >= a2).int() + (a1 >= a2).int() + (a3 > a2).int()
    r3 = (a0 >= a3).int() + (a1 >= a3).int() + (a2 >= a3).int()
    return (torch.stack((r0, r1, r2, r3), -1) < 2).reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: prune the ``int(sparsity · total)`` lowest scores overall,
    ``M = keep_top(concat_k S_k, total − ⌊p·total⌋)`` (global magnitude pruning, Han et al., arXiv 1506.02626).

    Scores must be comparable across tensors (e.g. magnitudes).
    """
    validate_sparsity(sparsity)
    if not scores:
        raise ValueError("scores must contain at least one tensor")
    names = list(scores)
    flat = torch.cat([scores[k].detach().reshape(-1).float().cpu() for k in names])
    keep = keep_top(flat, flat.numel() - int(sparsity * flat.numel()))
    out, offset = {}, 0
    for k in names:
        numel = scores[k].numel()
        out[k] = keep[offset : offset + numel].reshape(scores[k].shape).to(scores[k].device)
        offset += numel
    return out


def group_mask(group_scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Structured pruning over a 1-D vector of group scores (channels, heads): remove the ``n_prune`` lowest,
    ``M = keep_top(s, G − n_prune)`` (LLM-Pruner, Ma et al., arXiv 2305.11627; LoRAPrune, arXiv 2305.18403)."""
    if group_scores.dim() != 1:
        raise ValueError(f"group_scores must be 1-D (one score per group), got shape {tuple(group_scores.shape)}")
    if not 0 <= n_prune <= group_scores.numel():
        raise ValueError(f"n_prune must be in [0, {group_scores.numel()}], got {n_prune}")
    return keep_top(group_scores, group_scores.numel() - n_prune)


def gqa_unit_scores(
    scores: torch.Tensor, num_kv_heads: int, kv_head_scores: torch.Tensor | None = None, *, head_dim: int = 1
) -> torch.Tensor:
    """Scores of grouped-query-attention pruning units (GQA: Ainslie et al., 2023, arXiv 2305.13245).

    With GQA, query heads ``[g·k, (g+1)·k)`` (k = num_heads // num_kv_heads) share key/value head g, so the
    smallest removable unit is one KV head together with its k query heads; their ``k·head_dim`` channels (rows of
    q_proj, columns of o_proj) are consecutive. ``scores`` holds one score per query head (``head_dim=1``) or per
    channel; unit g scores ``U_g = Σ_{i ∈ run g} s_i`` (+ the KV head's own score when ``kv_head_scores`` is given),
    the runs being ``numel / num_kv_heads`` consecutive entries. For k/v projections the same call gives one unit
    per KV head.
    """
    n = scores.numel()
    if num_kv_heads <= 0 or head_dim <= 0 or n % (head_dim * num_kv_heads):
        raise ValueError(
            f"{n} scores do not split into num_kv_heads={num_kv_heads} units of whole heads of head_dim={head_dim}"
        )
    unit = scores.reshape(num_kv_heads, -1).sum(-1)
    if kv_head_scores is not None:
        unit = unit + kv_head_scores.reshape(num_kv_heads)
    return unit


def nm_violations(t: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups along the last dim holding more than N non-zeros, ``#{g : ‖t_g‖₀ > N}`` (0 ⇔ the tensor is
    N:M sparse, arXiv 2104.08378); -1 when the last dim is not a multiple of M."""
    if t.shape[-1] % m:
        return -1
    return int(((t.reshape(-1, m) != 0).sum(-1) > n).sum().item())


def is_nm_sparse(t: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every M consecutive elements of the last dim hold at most N non-zeros (N:M, arXiv 2104.08378)."""
    return nm_violations(t, n, m) == 0


def describe_pattern(tensors: Iterable[torch.Tensor], candidates: tuple[str, ...] = ("1:4", "2:4", "4:8")) -> str:
    """The sparsest N:M pattern (from ``candidates``, by N/M; ties in given order) that every tensor satisfies, i.e.
    ``nm_violations(t, N, M) = 0`` for all ``t`` (arXiv 2104.08378); ``"unstructured"`` when none or no tensors.

    Works on weights (non-zeros) and boolean masks (``True`` = kept) alike, and reads ``tensors`` exactly once, to
    the end, so a generator can produce (and account for) one mask at a time.
    """
    valid = sorted((p for p in map(parse_pattern, candidates) if p is not None), key=lambda p: p.n / p.m)
    seen = False
    for t in tensors:
        seen = True
        valid = [p for p in valid if nm_violations(t, p.n, p.m) == 0]
    return str(valid[0]) if seen and valid else "unstructured"


def mask_mismatch(weight: torch.Tensor, mask: torch.Tensor, nnz: int | None) -> str | None:
    """Why ``weight`` is not the base a sparse adapter's mask ``M`` was fixed on (``None`` when it is).

    Compatible ⇔ ``‖W ⊙ ¬M‖₀ = 0`` and ``‖W‖₀ = nnz`` (the count when the mask was fixed): the first catches a
    denser base, the second a base pruned further — both would silently change what a merge ``W + M ⊙ ΔW``
    produces (SQFT SparsePEFT, Muñoz et al., arXiv 2410.03750).
    """
    if tuple(weight.shape) != tuple(mask.shape):
        return f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}"
    nonzero = weight != 0
    outside = int((nonzero & ~mask).sum().item())
    if outside:
        return f"the base has {outside} non-zero weights where the adapter's mask is zero"
    if nnz is not None:
        now = int(nonzero.sum().item())
        if now != nnz:
            return f"the base has {now} non-zero weights inside the mask, the adapter was made for {nnz}"
    return None
