"""Sparsity masks: unstructured, N:M and structured groups, plus validators and statistics.

Pure tensor code, no Hugging Face imports. Every mask is boolean with ``True = kept``.
Scores follow the convention "higher = more important"; pruning removes the lowest scores.
Ties are broken deterministically: among equal scores the element with the *lower* index is kept
(stable sorting), so masks are reproducible across runs and ranks.

Pattern convention: ``"N:M"`` keeps at most N non-zeros in every M consecutive weights along the
input dimension (NVIDIA's convention: "2:4" = 2 of every 4 kept, "1:4" = 75 % sparse).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "NMPattern",
    "expand_group_mask",
    "global_masks",
    "gqa_unit_scores",
    "group_mask",
    "is_nm_sparse",
    "nm_mask",
    "nm_violations",
    "parse_pattern",
    "sparsity",
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
    """Parse ``"unstructured"`` / ``None`` (→ ``None``) or ``"N:M"`` with ``0 < N < M`` (→ :class:`NMPattern`)."""
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
    """Sparsity is the pruned fraction; it must lie in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{arg} must be in [0, 1) (fraction of weights removed), got {value!r}")
    return float(value)


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``n_keep`` highest scores along the last dim; ties keep the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        mask.scatter_(-1, order[..., :n_keep], True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Prune the ``int(sparsity · count)`` lowest scores per comparison group.

    ``scope="row"``: each output row is its own group (Wanda's per-output comparison);
    ``scope="layer"``: the whole tensor is one group (classic magnitude pruning).
    """
    validate_sparsity(sparsity)
    if scope == "row":
        flat = scores.reshape(-1, scores.shape[-1])
    elif scope == "layer":
        flat = scores.reshape(1, -1)
    else:
        raise ValueError(f"scope must be one of 'row', 'layer' (or 'global' through global_masks), got {scope!r}")
    n_prune = int(sparsity * flat.shape[-1])
    return _keep_top(flat, flat.shape[-1] - n_prune).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every M consecutive elements of the last dimension."""
    pattern = parse_pattern(f"{n}:{m}")
    assert pattern is not None
    if scores.shape[-1] % m:
        raise ValueError(
            f"pattern '{n}:{m}' needs the last dimension to be divisible by {m}, got shape {tuple(scores.shape)}"
        )
    groups = scores.reshape(-1, m)
    return _keep_top(groups, n).reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: prune the ``int(sparsity · total)`` lowest scores overall.

    Scores must be comparable across tensors (e.g. magnitudes).
    """
    validate_sparsity(sparsity)
    if not scores:
        raise ValueError("scores must contain at least one tensor")
    names = list(scores)
    flat = torch.cat([scores[k].detach().reshape(-1).float().cpu() for k in names])
    keep = _keep_top(flat, flat.numel() - int(sparsity * flat.numel()))
    out, offset = {}, 0
    for k in names:
        numel = scores[k].numel()
        out[k] = keep[offset : offset + numel].reshape(scores[k].shape).to(scores[k].device)
        offset += numel
    return out


def group_mask(group_scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Structured pruning over a 1-D vector of group scores (channels, heads): remove the ``n_prune`` lowest."""
    if group_scores.dim() != 1:
        raise ValueError(f"group_scores must be 1-D (one score per group), got shape {tuple(group_scores.shape)}")
    if not 0 <= n_prune <= group_scores.numel():
        raise ValueError(f"n_prune must be in [0, {group_scores.numel()}], got {n_prune}")
    return _keep_top(group_scores, group_scores.numel() - n_prune)


def expand_group_mask(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat each group's keep flag ``group_size`` times (e.g. head mask → output-channel mask)."""
    return mask.repeat_interleave(group_size)


def gqa_unit_scores(q_head_scores: torch.Tensor, num_kv_heads: int, kv_head_scores: torch.Tensor | None = None):
    """Scores of grouped-query-attention pruning units.

    With GQA, query heads ``[g·k, (g+1)·k)`` (k = num_heads // num_kv_heads) share key/value head g, so the
    smallest removable unit is one KV head together with its k query heads. Unit score = sum of its query-head
    scores (+ the KV head's own score when given).
    """
    num_heads = q_head_scores.numel()
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    unit = q_head_scores.reshape(num_kv_heads, num_heads // num_kv_heads).sum(-1)
    if kv_head_scores is not None:
        unit = unit + kv_head_scores.reshape(num_kv_heads)
    return unit


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((t == 0).sum().item()) / max(t.numel(), 1)


def nm_violations(t: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups along the last dim holding more than N non-zeros (0 ⇔ the tensor is N:M sparse)."""
    if t.shape[-1] % m:
        return -1
    return int(((t.reshape(-1, m) != 0).sum(-1) > n).sum().item())


def is_nm_sparse(t: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every M consecutive elements of the last dim hold at most N non-zeros."""
    return nm_violations(t, n, m) == 0
