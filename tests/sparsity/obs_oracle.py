"""Independent SparseGPT oracle for the tests: exact OBS updates in float64, written from the formulas.

Frantar & Alistarh 2023 (arXiv 2301.00774), restated in /work/shared/reference/methods.md §9.2. No prune_peft code is
used. For one row w and the (damped) Hessian H, with G = H⁻¹ over the columns still free to move:

- pruning column q:            w ← w − (w_q / G_qq) · G_{:,q}          (the OBS compensation; makes w_q exactly 0)
- freezing column q afterwards: G ← G − G_{:,q} G_{q,:} / G_qq          (Schur complement: G becomes the inverse of H
                                                                         restricted to the remaining columns)

SparseGPT visits the columns left to right and freezes every visited column, pruned or kept, so a column is never
changed after its turn; the oracle does exactly that, one explicit rank-1 update per column (no Cholesky factor, no
lazy block updates). Mask selection uses the OBS saliency w_q² / G_qq with G taken at q's turn (a property of H only):
for unstructured sparsity the ``int(sparsity · rows · cols)`` lowest of each ``blocksize``-column block, chosen with
the weights as they are when the block starts; for N:M the M − N lowest of every M columns of each row, chosen when
the group starts. Dead inputs (H_jj = 0) get H_jj = 1 and zero weights; damping adds percdamp · mean(diag H) · I.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def obs_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    n_prune: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight in float64, keep mask) of the exact column-ordered OBS solution. ``n_prune`` (unstructured,
    instead of ``sparsity``): that many zeros in all, block b taking ⌊q_b⌋ or ⌈q_b⌉ of its share
    q_b = n_prune · (block size) / (rows · cols), the extra ones to the largest fractions, ties to the earlier block."""
    W = weight.detach().double().clone()
    H = H.detach().double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    for j in range(cols):
        if dead[j]:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    G0 = torch.linalg.inv(H)

    # G_qq at q's turn: eliminate the columns before q one at a time (Schur complements)
    G = G0.clone()
    den = torch.empty(cols, dtype=torch.float64)
    for q in range(cols):
        den[q] = G[q, q]
        G = G - torch.outer(G[:, q], G[q, :]) / G[q, q]

    starts = list(range(0, cols, blocksize))
    block_prune = [int(rows * min(blocksize, cols - q) * sparsity) if sparsity is not None else 0 for q in starts]
    if n_prune is not None:
        shares = [Fraction(n_prune * min(blocksize, cols - q), cols) for q in starts]  # exact: ties stay ties
        block_prune = [int(x) for x in shares]  # floors, then one more for the largest fractions
        for i in sorted(range(len(shares)), key=lambda i: (-(shares[i] - int(shares[i])), i))[
            : n_prune - sum(block_prune)
        ]:
            block_prune[i] += 1

    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    # the unstructured block masks depend on all rows at the block's start, so the rows advance column by column
    # together; each row's update below still uses only that row's own weights
    G = G0.clone()
    for q in range(cols):
        if (sparsity is not None or n_prune is not None) and nm is None and q % blocksize == 0:
            block = slice(q, min(q + blocksize, cols))
            saliency = (W[:, block] ** 2 / den[block]).flatten()
            chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
            chosen[torch.sort(saliency, stable=True).indices[: block_prune[q // blocksize]]] = True
            pruned[:, block] = chosen.reshape(rows, -1)
        if nm is not None and q % nm[1] == 0:
            n, m = nm
            for r in range(rows):
                saliency = W[r, q : q + m] ** 2 / den[q : q + m]
                pruned[r, q + torch.sort(saliency, stable=True).indices[: m - n]] = True
        for r in range(rows):
            if pruned[r, q]:
                W[r] = W[r] - (W[r, q] / G[q, q]) * G[:, q]
                W[r, q] = 0.0  # exactly (the update makes it 0 up to rounding)
        G = G - torch.outer(G[:, q], G[q, :]) / G[q, q]  # freeze column q
    keep = ~pruned & ~dead.unsqueeze(0)
    W[~keep] = 0.0
    return W, keep
