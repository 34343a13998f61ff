"""SparseGPT one-shot pruning (Frantar & Alistarh, ICML 2023, arXiv 2301.00774).

Given W (d_out × d_in) and H = (2/T)·Σ x xᵀ over calibration inputs, prune columns left to right. For each
column i with pruned entries q_i = 0, the OBS update compensates the remaining columns:

    err  = (w_i − q_i) / [H⁻¹]_ii
    W[:, i:] −= err · [H⁻¹]_{i, i:}

using the upper Cholesky factor of H⁻¹ (so each row of it is the needed slice of the sequentially updated
inverse). The mask of a block of columns is chosen by the OBS saliency w²/[H⁻¹]_jj² — block-locally for
unstructured sparsity, per M columns for N:M. Dead inputs (H_jj = 0) are zeroed; damping adds
``percdamp · mean(diag H)`` to the diagonal.
"""

from __future__ import annotations

import torch

from .masks import NMPattern, validate_sparsity
from .owl import largest_remainder

__all__ = ["sparsegpt_prune"]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    n_prune: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, arXiv 2301.00774): prune ``weight`` column by column with the OBS update
    ``W[:, i:] −= (w_i − q_i)/[H⁻¹]_ii · [H⁻¹]_{i, i:}``, masks chosen by the saliency ``w²/[H⁻¹]_jj²``.

    Return ``(W_pruned, keep_mask)``; exactly ``int(sparsity·rows·cols_in_block)`` zeros per column block
    (unstructured) or N kept per M (pattern). Computed in float32 (float64 for float64 input); the result has
    ``weight``'s dtype.

    ``n_prune`` (unstructured only; replaces ``sparsity``): prune exactly that many weights of the layer, split
    over the column blocks in proportion to their size by largest-remainder rounding — OWL's integer layer counts
    (:func:`prune_peft.sparsity.owl.owl_prune_counts`)."""
    cols = weight.shape[1]
    if n_prune is not None:
        numel = weight.shape[0] * cols
        if pattern is not None or isinstance(n_prune, bool) or not isinstance(n_prune, int):
            raise ValueError(f"n_prune must be an integer (unstructured only, no pattern), got {n_prune!r}")
        if not 0 <= n_prune <= numel:
            raise ValueError(f"n_prune must be in [0, {numel}] (the weight's size), got {n_prune}")
    elif pattern is None:
        sparsity = validate_sparsity(sparsity if sparsity is not None else -1.0)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize}")
    if not 0 <= percdamp:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}), got {tuple(H.shape)}")
    if pattern is not None:
        if cols % pattern.m:
            raise ValueError(f"pattern '{pattern}' needs in_features divisible by {pattern.m}, got {cols}")
        # A block boundary must not split an M-group.
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    block_prune = None  # unstructured with n_prune: each column block's count, Σ = n_prune
    if n_prune is not None:
        block_prune = largest_remainder([min(blocksize, cols - i) for i in range(0, cols, blocksize)], n_prune)

    dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 input
    W = weight.detach().clone().to(dtype)
    H = H.detach().clone().to(device=W.device, dtype=dtype)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=W.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as exc:  # pragma: no cover - depends on data
        raise RuntimeError(f"SparseGPT: Hessian not positive definite; increase percdamp (now {percdamp})") from exc

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
        if pattern is None:
            saliency = (W1**2 / d.unsqueeze(0) ** 2).flatten()
            k = block_prune[i1 // blocksize] if block_prune is not None else int(saliency.numel() * sparsity)
            order = torch.sort(saliency, stable=True).indices
            mask1.view(-1)[order[:k]] = True
        for i in range(count):
            if pattern is not None and i % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                order = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
                mask1.scatter_(1, i + order, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep = ~pruned & ~dead.unsqueeze(0)
    W[~keep] = 0.0
    return W.to(weight.dtype), keep
