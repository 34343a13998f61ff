"""S-STE (arXiv 2409.09099): soft-threshold projection, frozen scale, straight-through gradient, flip statistics."""

import itertools

import pytest
import torch

from prune_peft.sparsity import is_nm_sparse
from prune_peft.sparsity.sste import MaskFlipTracker, soft_threshold24, sste_scale, sste_weight, topk24_mask


def _brute(group: list[float]) -> list[float]:
    """Per-group oracle: sort magnitudes, t = 2nd smallest, shrink the two largest by t."""
    mags = sorted(abs(v) for v in group)
    t = mags[1]
    order = sorted(range(4), key=lambda i: (-abs(group[i]), i))[:2]
    return [(1 if group[i] > 0 else -1) * max(abs(group[i]) - t, 0.0) if i in order else 0.0 for i in range(4)]


def test_soft_threshold_matches_oracle_and_is_24():
    torch.manual_seed(0)
    w = torch.randn(16, 32, dtype=torch.float64)
    s, mask = soft_threshold24(w)
    expected = torch.tensor([_brute(g.tolist()) for g in w.reshape(-1, 4)], dtype=torch.float64).reshape(w.shape)
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    assert is_nm_sparse(s, 2, 4)
    assert int(mask.reshape(-1, 4).sum(-1).min()) == 2 and int(mask.reshape(-1, 4).sum(-1).max()) == 2
    assert bool((s[~mask] == 0).all())
    # the kept weights shrink by exactly t (keeping their sign)
    assert bool(((s.abs() <= w.abs()) & ((s == 0) | (torch.sign(s) == torch.sign(w)))).all())


def test_soft_threshold_is_continuous_where_hard_topk_jumps():
    # two magnitudes crossing: hard top-2 jumps by ~1.0, S moves by ~eps
    eps = 1e-6
    a = torch.tensor([[1.0, 0.5 + eps, 0.5 - eps, 0.1]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.5 - eps, 0.5 + eps, 0.1]], dtype=torch.float64)
    sa, ma = soft_threshold24(a)
    sb, mb = soft_threshold24(b)
    assert not torch.equal(ma, mb)
    assert float((sa - sb).abs().max()) <= 4 * eps
    assert float(((a * ma) - (b * mb)).abs().max()) > 0.4


def test_already_24_is_identity_with_unit_scale():
    torch.manual_seed(1)
    w = torch.randn(8, 16, dtype=torch.float64)
    w = w * topk24_mask(w)
    s, _ = soft_threshold24(w)
    assert torch.equal(s, w)
    assert float(sste_scale(w)) == pytest.approx(1.0, abs=1e-6)


def test_scale_is_least_squares_minimiser():
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    beta = float(sste_scale(w))
    s, _ = soft_threshold24(w.double())

    def err(b: float) -> float:
        return float(((w.double() - b * s) ** 2).sum())

    assert beta > 1.0  # S shrinks, β re-inflates
    for delta in (1e-3, -1e-3, 1e-2, -1e-2):
        assert err(beta) <= err(beta + delta)
    expected = float((w.double() * s).sum() / (s * s).sum())
    assert beta == pytest.approx(expected, rel=1e-6)


def test_straight_through_gradient_is_dense_identity():
    torch.manual_seed(3)
    w = torch.randn(8, 16, requires_grad=True)
    beta = sste_scale(w)
    x = torch.randn(5, 16)
    y = x @ sste_weight(w, beta).t()
    g = torch.randn_like(y)
    y.backward(g)
    # ∂L/∂W_sp = gᵀ x, passed through unchanged: dense (no mask), no β
    torch.testing.assert_close(w.grad, g.t() @ x)
    assert bool((w.grad != 0).all())
    s, _ = soft_threshold24(w.detach())
    torch.testing.assert_close(sste_weight(w, beta).detach(), s * beta)


def test_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        soft_threshold24(torch.randn(4, 6))


def test_mask_flip_tracker_counts_changes():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    tr = MaskFlipTracker()
    first = tr.update({"a": w})
    assert first["flips"] == 0 and first["positions"] == 8
    w2 = w.clone()
    w2[0, 2] = 10.0  # group 0: kept {0,1} -> {0,2}: 2 positions flip
    stats = tr.update({"a": w2})
    assert stats["flips"] == 2 and stats["flip_fraction"] == pytest.approx(2 / 8)
    assert tr.update({"a": w2})["flips"] == 0


@pytest.mark.parametrize("values", list(itertools.permutations([3.0, 1.0, 2.0, 0.5])))
def test_topk_mask_all_orders(values):
    w = torch.tensor([values])
    mask = topk24_mask(w)
    kept = sorted(range(4), key=lambda i: -values[i])[:2]
    assert mask[0].tolist() == [i in kept for i in range(4)]
