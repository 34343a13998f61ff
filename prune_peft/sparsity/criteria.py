"""Importance criteria for one-shot pruning (pure tensor code).

- magnitude: S_ij = |W_ij|
- Wanda (Sun et al., 2023, arXiv 2306.11695): S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input
  feature j over the calibration tokens. Only the ranking within a comparison group matters, so we use the
  root-mean-square over tokens (the norm divided by √tokens), which is scale-free in the number of tokens.
"""

from __future__ import annotations

import torch

__all__ = ["InputStats", "magnitude_scores", "wanda_scores"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score ``S_ij = |W_ij|`` (float32; Han et al., 2015, arXiv 1506.02626)."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """Wanda's score (Sun et al., 2023, arXiv 2306.11695) ``S_ij = |W_ij| · sqrt(mean_t x_tj²)``; ``act_sq_mean`` has
    one entry per input feature."""
    if act_sq_mean.shape != (weight.shape[-1],):
        raise ValueError(
            f"act_sq_mean must have shape ({weight.shape[-1]},) to match the weight's input dim, "
            f"got {tuple(act_sq_mean.shape)}"
        )
    return weight.detach().float().abs() * act_sq_mean.to(weight.device).float().sqrt().unsqueeze(0)


class InputStats:
    """Streams calibration inputs of one linear layer.

    Keeps the per-feature mean of x² (Wanda, arXiv 2306.11695) and, when ``hessian=True``, H = (2/T)·Σ_t x_t x_tᵀ
    (SparseGPT, arXiv 2301.00774), both in float32, updated as running means so batches of any size can be added.
    """

    def __init__(self, in_features: int, *, hessian: bool = False, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sq_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().to(self.sq_mean.device)
        t = x.shape[0]
        if t == 0:
            return
        total = self.tokens + t
        self.sq_mean.mul_(self.tokens / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        if self.H is not None:
            self.H.mul_(self.tokens / total).add_(x.T @ x, alpha=2.0 / total)
        self.tokens = total
