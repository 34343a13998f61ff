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
