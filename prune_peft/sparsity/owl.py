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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["OWL_DEFAULT_LAMBDA", "OWL_DEFAULT_M", "check_owl_args", "layer_outlier_ratio", "owl_layer_sparsities"]

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
