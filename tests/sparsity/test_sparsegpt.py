import sys
from pathlib import Path

import pytest
import torch

from prune_peft.sparsity import (
    InputStats,
    NMPattern,
    is_nm_sparse,
    magnitude_scores,
    nm_mask,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from obs_oracle import obs_prune


def _layer(seed=0, d_out=32, d_in=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    # correlated inputs with uneven feature scales, as in real activations
    mix = torch.randn(d_in, d_in, generator=g) * 0.3 + torch.eye(d_in)
    X = (torch.randn(tokens, d_in, generator=g) @ mix) * torch.linspace(0.2, 3.0, d_in)
    stats = InputStats(d_in, hessian=True)
    stats.add(X)
    return W, X, stats


def _err(W, W_hat, X):
    return torch.linalg.norm(X @ W.T - X @ W_hat.T).item()


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction(pattern):
    W, X, stats = _layer()

    def mask_of(scores):
        return nm_mask(scores, 2, 4) if pattern else unstructured_mask(scores, 0.5, "row")

    w_mag = W * mask_of(magnitude_scores(W))
    w_wanda = W * mask_of(wanda_scores(W, stats.sq_mean))
    w_sgpt, keep = sparsegpt_prune(W, stats.H, 0.5, pattern)  # default blocksize 128 ≥ d_in
    e_mag, e_wanda, e_sgpt = _err(W, w_mag, X), _err(W, w_wanda, X), _err(W, w_sgpt, X)
    assert e_sgpt < e_wanda < e_mag
    assert ((w_sgpt == 0) == ~keep).all()
    if pattern:
        assert is_nm_sparse(w_sgpt, 2, 4)
    else:
        # exactly int(0.5 · rows · cols_in_block) zeros (one block here)
        assert int((w_sgpt == 0).sum()) == 32 * 64 // 2


def test_sparsegpt_zero_sparsity_is_identity():
    W, _, stats = _layer(seed=3)
    w, keep = sparsegpt_prune(W, stats.H, 0.0)
    assert keep.all()
    torch.testing.assert_close(w, W, rtol=0, atol=0)


def test_sparsegpt_blocksize_respects_nm_groups():
    W, _, stats = _layer(seed=4, d_in=48)
    w, _ = sparsegpt_prune(W, stats.H, pattern=NMPattern(1, 3), blocksize=16)  # 16 % 3 != 0 → aligned internally
    assert is_nm_sparse(w, 1, 3)


def test_sparsegpt_dead_inputs_zeroed():
    W, X, _ = _layer(seed=5)
    X[:, 7] = 0.0
    stats = InputStats(64, hessian=True)
    stats.add(X)
    w, keep = sparsegpt_prune(W, stats.H, 0.25)
    assert (w[:, 7] == 0).all() and not keep[:, 7].any()


def test_sparsegpt_bad_input():
    W, _, stats = _layer()
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_prune(W, stats.H, 1.2)
    with pytest.raises(ValueError, match="H must have shape"):
        sparsegpt_prune(W, stats.H[:4, :4], 0.5)
    with pytest.raises(ValueError, match="divisible by 3"):
        sparsegpt_prune(W, stats.H, pattern=NMPattern(2, 3))


# ------------------------------------------------------------------------------ independent oracle: exact OBS


@pytest.mark.parametrize(
    "sparsity,pattern,blocksize",
    [(0.5, None, 128), (0.5, None, 16), (0.3, None, 24), (None, NMPattern(2, 4), 128), (None, NMPattern(1, 3), 16)],
)
@pytest.mark.parametrize("dead", [False, True])
def test_sparsegpt_equals_the_exact_obs_solution(sparsity, pattern, blocksize, dead):
    d_in = 48
    W, X, _ = _layer(seed=7, d_out=12, d_in=d_in, tokens=256)
    X = X.double()
    if dead:
        X[:, 5] = 0.0
    H = 2.0 / X.shape[0] * X.T @ X
    W = W.double()
    nm = (pattern.n, pattern.m) if pattern else None
    expected, keep_expected = obs_prune(W, H, sparsity, nm, blocksize=blocksize, percdamp=0.01)
    w, keep = sparsegpt_prune(W, H, sparsity, pattern, blocksize=blocksize, percdamp=0.01)
    assert w.dtype == torch.float64
    assert torch.equal(keep, keep_expected)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
    # float32 compute (the default for float32 weights) stays close to the exact solution
    w32, keep32 = sparsegpt_prune(W.float(), H.float(), sparsity, pattern, blocksize=blocksize, percdamp=0.01)
    assert torch.equal(keep32, keep_expected)
    torch.testing.assert_close(w32.double(), expected, rtol=0, atol=1e-4)


def test_obs_oracle_is_the_least_squares_optimum_for_a_fixed_mask():
    """Sanity of the oracle itself: with one column pruned and all others free (OBS, no freezing), the OBS update
    equals the least-squares re-fit min ‖X wᵀ − X w'ᵀ‖ over w' with w'_q = 0."""
    W, X, _ = _layer(seed=8, d_out=1, d_in=8, tokens=64)
    X, w = X.double(), W.double()[0]
    H = X.T @ X
    q = 0  # column 0 first: no earlier column is frozen, so the oracle's update is the plain OBS step
    G = torch.linalg.inv(H)
    obs = w - (w[q] / G[q, q]) * G[:, q]
    keep = torch.arange(8) != q
    refit = torch.zeros(8, dtype=torch.float64)
    refit[keep] = torch.linalg.lstsq(X[:, keep], X @ w).solution
    torch.testing.assert_close(obs, refit, rtol=0, atol=1e-9)
