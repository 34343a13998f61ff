"""OWL: outlier-weighed layerwise sparsity (Yin et al., 2023, arXiv 2310.05175), pure tensor code.

A decoder layer with many activation outliers is hurt more by pruning, so OWL gives it a lower sparsity:

- layer outlier ratio (LOD) of layer l, pooled over the Wanda scores S = |W_ij|·‖X_j‖ of all its pruned linears:
  D_l = (1/N_l) Σ_ij 1[S_ij > M · mean(S)]
- allocation (rule of the authors' code, github:luuyin/OWL ``prune_wanda_outlier``, also llm-compressor's
  ``sparsity_profile="owl"``): min-max normalise the ratios into a band of width 2λ,
  n_l = 2λ · (D_l − min D) / (max D − min D), then centre the band on the target density:
  s_l = s − (n_l − n̄),   n̄ = Σ_l w_l n_l / Σ_l w_l.
  With w_l the number of pruned parameters of layer l, Σ_l w_l s_l / Σ_l w_l = s exactly, i.e. the model's pruned
  fraction is the target. The reference code uses the plain mean over layers, which is the same thing for decoder
  layers of equal size (every layer of a transformer); the weighted mean keeps it exact when include/exclude make
  layers differ. The band [s + n̄ − 2λ, s + n̄] has width 2λ and is [s − λ, s + λ] when n̄ = λ (ratios spread
  symmetrically); with skewed ratios one layer can move up to 2λ from s, so λ < min(s, 1 − s)/2 keeps every layer's
  sparsity inside (0, 1).

Exact mean in integers: the fractional s_l become integer prune counts whose sum is the model's target
T = ⌊s·N + ½⌋ (N the pruned parameters, halves rounded up) by largest-remainder rounding
(:func:`owl_prune_counts`); a layer's count is split over its linears the same way and over each linear's rows by
:func:`spread_over_rows` (per-row counts differ by at most one), so the realized sparsity is T / N exactly instead of
falling short by the per-row floor ⌊s_l · d_in⌋ of every row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

import torch

__all__ = [
    "OWL_DEFAULT_LAMBDA",
    "OWL_DEFAULT_M",
    "check_owl_args",
    "largest_remainder",
    "layer_outlier_ratio",
    "owl_layer_sparsities",
    "owl_prune_counts",
    "spread_over_rows",
]

OWL_DEFAULT_M = 5.0  # the paper's / the OWL README's Hyper_m for LLaMA
OWL_DEFAULT_LAMBDA = 0.08  # the paper's / the OWL README's Lamda


def check_owl_args(sparsity: float, m: float, lam: float) -> None:
    """Validate OWL's hyperparameters for a target ``sparsity``: ``M > 0`` (finite), ``0 ≤ λ < min(s, 1 − s)/2``."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise ValueError(f"owl_m (OWL's outlier threshold multiplier M) must be a finite number > 0, got {m!r}")
    bound = min(sparsity, 1.0 - sparsity) / 2
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < bound):
        raise ValueError(
            f"owl_lambda (OWL's λ, the half-width of the layer sparsity band) must be in [0, {bound:g}) for "
            f"sparsity={sparsity:g} (λ < min(s, 1 − s)/2 keeps every layer's sparsity in (0, 1)), got {lam!r}"
        )


def layer_outlier_ratio(scores: torch.Tensor | Iterable[torch.Tensor], m: float = OWL_DEFAULT_M) -> float:
    """OWL's layer outlier ratio D = (1/N) Σ 1[S > M · mean(S)] over all scores of one layer pooled
    (Yin et al., 2023, arXiv 2310.05175, Eq. of LOD; the scores are Wanda's |W_ij|·‖X_j‖ of the layer's linears).

    A fraction in [0, 1] (the reference code reports it ×100; the allocation is invariant to that scale)."""
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not parts or sum(p.numel() for p in parts) == 0:
        raise ValueError("scores: layer_outlier_ratio needs at least one score")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise ValueError(f"m must be a finite number > 0, got {m!r}")
    total = sum(p.detach().double().sum() for p in parts)
    numel = sum(p.numel() for p in parts)
    threshold = m * total / numel
    above = sum(int((p.detach().double() > threshold).sum()) for p in parts)
    return above / numel


def owl_layer_sparsities(
    outlier_ratios: Sequence[float],
    sparsity: float,
    lam: float = OWL_DEFAULT_LAMBDA,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Per-layer sparsities s_l = s − (n_l − n̄) with n_l = 2λ·(D_l − min D)/(max D − min D) and n̄ the
    ``weights``-weighted mean of n (OWL, Yin et al., 2023, arXiv 2310.05175; the authors' allocation rule).

    ``weights`` (default: equal) are the layers' pruned parameter counts, so Σ w_l s_l / Σ w_l = s exactly.
    Equal ratios (or λ = 0) give the uniform allocation."""
    ratios = torch.as_tensor(list(outlier_ratios), dtype=torch.float64)
    if ratios.ndim != 1 or ratios.numel() == 0 or not torch.isfinite(ratios).all():
        raise ValueError(f"outlier_ratios must be a non-empty sequence of finite numbers, got {outlier_ratios!r}")
    w = torch.ones_like(ratios) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != ratios.shape or not (w > 0).all():
        raise ValueError(f"weights must be {ratios.numel()} positive numbers (one per layer), got {weights!r}")
    check_owl_args(sparsity, 1.0, lam)
    spread = ratios.max() - ratios.min()
    if spread <= 0 or lam == 0:
        return [float(sparsity)] * ratios.numel()
    n = (ratios - ratios.min()) / spread * (2 * lam)
    s = sparsity - (n - (w * n).sum() / w.sum())
    return [float(v) for v in s]


def largest_remainder(quotas: Sequence[float], total: int) -> list[int]:
    """Integers k_i with Σ k_i = ``total`` exactly, each ⌊q'_i⌋ or ⌈q'_i⌉ of its rescaled quota q'_i = q_i·T / Σ q
    (largest-remainder / Hamilton apportionment, Hamilton 1792; Balinski & Young, *Fair Representation*, 1982).

    Every k_i starts at ⌊q'_i⌋; the T − Σ⌊q'_i⌋ units left go to the largest remainders q'_i − ⌊q'_i⌋, ties to the
    lower index. Computed in exact rational arithmetic (the quotas' binary values), so no float rounding can move a
    unit: the result is deterministic."""
    quotas = list(quotas)
    if not quotas or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in quotas):
        raise ValueError(f"quotas must be a non-empty sequence of finite numbers >= 0, got {quotas!r}")
    q = [Fraction(v) for v in quotas]
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an integer >= 0, got {total!r}")
    if total == 0:
        return [0] * len(q)
    if sum(q) <= 0:
        raise ValueError(f"quotas must not all be 0 when total={total} > 0, got {quotas!r}")
    scaled = [v * total / sum(q) for v in q]
    counts = [math.floor(v) for v in scaled]
    order = sorted(range(len(q)), key=lambda i: (counts[i] - scaled[i], i))  # largest remainder first
    for i in order[: total - sum(counts)]:  # 0 ≤ T − Σ⌊q'⌋ < n since Σ q' = T exactly
        counts[i] += 1
    return counts


def owl_prune_counts(layer_sparsities: Sequence[float], sizes: Sequence[int], sparsity: float) -> list[int]:
    """Integer prune counts k_l of OWL's layers, Σ_l k_l = T = ⌊s·N + ½⌋ with N = Σ_l w_l (the nearest integer to the
    target, halves rounded up), each k_l the largest-remainder rounding of its quota s_l·w_l (Yin et al., 2023,
    arXiv 2310.05175, made exact in integers; see :func:`largest_remainder`).

    Since Σ_l s_l·w_l = s·N, every k_l is within one weight of s_l·w_l (rescaled by T / (s·N)); no layer gets more
    than its ``w_l`` weights."""
    sizes = list(sizes)
    fractions = list(layer_sparsities)
    if len(sizes) != len(fractions) or not sizes:
        raise ValueError(f"sizes must hold one positive integer per layer ({len(fractions)}), got {sizes!r}")
    if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in sizes):
        raise ValueError(f"sizes must be positive integers (parameters per layer), got {sizes!r}")
    if any(not (isinstance(v, (int, float)) and 0 <= v < 1) for v in [sparsity, *fractions]):
        raise ValueError(f"sparsity and layer_sparsities must be in [0, 1), got {sparsity!r} and {fractions!r}")
    total = math.floor(sparsity * sum(sizes) + 0.5)
    counts = largest_remainder([v * w for v, w in zip(fractions, sizes)], total)
    over = [(i, k, w) for i, (k, w) in enumerate(zip(counts, sizes)) if k > w]
    if over:  # pragma: no cover - needs s_l within 1/w_l of 1, which check_owl_args rules out
        raise ValueError(f"layer_sparsities: layer {over[0][0]} would prune {over[0][1]} of its {over[0][2]} weights")
    return counts


def spread_over_rows(count: int, rows: int, cols: int) -> torch.Tensor:
    """Per-row prune counts of a (rows × cols) weight that prunes ``count`` in all: k_r = ⌊k/R⌋ + [r < k mod R], so
    they sum to k, differ by at most one, and the first rows take the extra weight (deterministic). Returns an int64
    tensor of shape [rows]. Used for OWL's integer layer counts with Wanda's per-output comparison groups
    (Sun et al., 2023, arXiv 2306.11695)."""
    for arg, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= rows * cols:
        raise ValueError(f"count must be an integer in [0, {rows * cols}] (rows × cols), got {count!r}")
    base, extra = divmod(count, rows)
    return torch.full((rows,), base, dtype=torch.int64) + (torch.arange(rows) < extra).long()
