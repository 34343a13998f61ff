"""Q-Tuning selection math (prune_peft.sparsity.qtuning, arXiv 2509.23873): pure tensor functions against oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_peft.sparsity.qtuning import (
    eu_triage,
    sample_ppl_entropy,
    select_samples,
    select_tokens,
    token_nll_entropy,
    token_scores,
)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 64),
    ratio=st.floats(0.01, 1.0),
    corr=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_bisection_hits_target_share_within_one_sample(n, ratio, corr, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ent = corr * a + math.sqrt(1 - corr**2) * b  # any correlation between error and uncertainty
    keep, quadrant = select_samples(a.exp(), ent, ratio)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert abs(int(keep.sum()) - ratio * n) <= 1
    assert int(keep.sum()) >= 1
    # kept samples are labelled Q2/Q4, dropped ones Q1/Q3
    assert set(quadrant[keep].tolist()) <= {2, 4}
    assert set(quadrant[~keep].tolist()) <= {1, 3}


def test_quadrants_on_constructed_statistics():
    # 4 clusters of 4 samples, one per quadrant: (PPL, Ent)
    ppl = torch.tensor([100.0, 110, 120, 130] * 2 + [2.0, 2.2, 2.4, 2.6] * 2)
    hi, lo = [5.0, 5.1, 5.2, 5.3], [0.1, 0.2, 0.3, 0.4]
    ent = torch.tensor([*hi, *lo, *lo, *hi])
    expected = torch.tensor([1] * 4 + [2] * 4 + [3] * 4 + [4] * 4)
    keep, quadrant = select_samples(ppl, ent, sample_ratio=0.5)
    assert torch.equal(quadrant, expected)
    assert torch.equal(keep, (expected == 2) | (expected == 4))
    # at 25 % two samples of each kept corner remain, still inside the (now tighter) thresholds
    tri = eu_triage(ppl, ent, sample_ratio=0.25)
    assert int((tri.keep & (expected == 2)).sum()) == 2 and int((tri.keep & (expected == 4)).sum()) == 2
    assert tri.level < 0.5
    th = tri.thresholds
    assert (ppl[tri.keep & (tri.quadrant == 2)] >= th["ppl_high"]).all()
    assert (ent[tri.keep & (tri.quadrant == 2)] <= th["ent_low"]).all()
    assert (ppl[tri.keep & (tri.quadrant == 4)] <= th["ppl_low"]).all()
    assert (ent[tri.keep & (tri.quadrant == 4)] >= th["ent_high"]).all()


@pytest.mark.parametrize("seed", range(6))
def test_triage_matches_brute_force_quantile_thresholds(seed):
    g = torch.Generator().manual_seed(seed)
    n, ratio = 23, 0.3
    ppl, ent = torch.rand(n, generator=g).double() * 9 + 1, torch.rand(n, generator=g).double()
    k = round(ratio * n)

    def kept_at(t):  # the definition, with value-space quantile thresholds
        q = torch.tensor([t, 1 - t], dtype=torch.float64)
        p_lo, p_hi = torch.quantile(ppl, q)
        e_lo, e_hi = torch.quantile(ent, q)
        eps = 1e-12
        q2 = (ppl >= p_hi - eps) & (ent <= e_lo + eps)
        q4 = (ppl <= p_lo + eps) & (ent >= e_hi - eps)
        return q2 | q4

    levels = [j / (n - 1) for j in range(n)]
    j = next(j for j, t in enumerate(levels) if int(kept_at(t).sum()) >= k)
    tri = eu_triage(ppl, ent, ratio)
    assert int(tri.keep.sum()) == k and tri.level == pytest.approx(levels[j])
    assert not (tri.keep & ~kept_at(levels[j])).any()  # inside the thresholds found by bisection
    if j:
        assert not (kept_at(levels[j - 1]) & ~tri.keep).any()  # and everything the next lower level keeps


def test_perfectly_correlated_batch_still_meets_budget():
    # every sample on the diagonal: Q2/Q4 are empty at the median split, so the level passes 1/2
    x = torch.arange(1.0, 11.0)
    tri = eu_triage(x.exp(), x, sample_ratio=0.3)
    assert int(tri.keep.sum()) == 3 and tri.level > 0.5


def test_selection_depends_on_ranks_only():
    g = torch.Generator().manual_seed(0)
    ppl, ent = torch.rand(20, generator=g) * 50 + 1, torch.rand(20, generator=g)
    k1, q1 = select_samples(ppl, ent, 0.25)
    k2, q2 = select_samples(ppl.log(), ent * 7 + 3, 0.25)
    assert torch.equal(k1, k2) and torch.equal(q1, q2)


def test_samples_without_response_tokens_are_never_kept():
    ppl = torch.tensor([5.0, float("nan"), 1.0, 9.0, 2.0])
    ent = torch.tensor([0.1, float("nan"), 2.0, 3.0, 0.5])
    keep, quadrant = select_samples(ppl, ent, 1.0)
    assert keep.tolist() == [True, False, True, True, True] and quadrant[1] == 0
    with pytest.raises(ValueError, match="no sample in the batch has response tokens"):
        select_samples(torch.full((3,), float("nan")), torch.full((3,), float("nan")), 0.5)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_ratios_are_rejected(bad):
    with pytest.raises(ValueError, match="sample_ratio must be a number in \\(0, 1\\]"):
        select_samples(torch.ones(4), torch.ones(4), bad)
    with pytest.raises(ValueError, match="token_ratio must be a number in \\(0, 1\\]"):
        select_tokens(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), bad)


def test_token_scores_match_formula():
    nll = torch.tensor([[0.5, 1.0, 2.0, 0.1, 3.0, 0.7]])
    mask = torch.tensor([[False, True, True, True, True, False]])
    lam = 0.3
    p = [math.exp(x) for x in nll[0].tolist()]
    s = token_scores(nll, mask, lam)
    # response = positions 1..4; missing neighbours (0 and 5 are not response tokens) use the token's own PPL
    expected = {
        1: (1 - lam) * p[1] + lam * (p[1] + p[2]),
        2: (1 - lam) * p[2] + lam * (p[1] + p[3]),
        3: (1 - lam) * p[3] + lam * (p[2] + p[4]),
        4: (1 - lam) * p[4] + lam * (p[3] + p[4]),
    }
    for i, v in expected.items():
        assert s[0, i].item() == pytest.approx(v, rel=1e-12)
    assert torch.isnan(s[0, 0]) and torch.isnan(s[0, 5])
    half = token_scores(nll, mask, lam, neighbor_mean=True)
    assert half[0, 2].item() == pytest.approx((1 - lam) * p[2] + lam * (p[1] + p[3]) / 2, rel=1e-12)


def test_select_tokens_keeps_ratio_of_top_or_bottom_scores_per_sample():
    g = torch.Generator().manual_seed(1)
    nll = torch.rand(5, 12, generator=g) * 4
    mask = torch.zeros(5, 12, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 12), (0, 5), (6, 7), (3, 10), (0, 0)]):
        mask[b, s:e] = True
    for ratio in (0.5, 0.7, 1.0):
        keep = select_tokens(nll, mask, ratio, lam=0.5, keep="low")
        assert not (keep & ~mask).any()
        scores = token_scores(nll, mask, 0.5)
        for b in range(5):
            n = int(mask[b].sum())
            k = math.ceil(round(ratio * n, 9))
            assert int(keep[b].sum()) == k
            if 0 < k < n:  # kept scores are the k lowest
                assert scores[b][keep[b]].max() <= scores[b][mask[b] & ~keep[b]].min()
        high = select_tokens(nll, mask, ratio, lam=0.5)  # the default: the top-scoring tokens
        for b in range(5):
            if 0 < int(high[b].sum()) < int(mask[b].sum()):
                assert scores[b][high[b]].min() >= scores[b][mask[b] & ~high[b]].max()


def test_token_nll_entropy_and_sample_stats_match_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, :] = -100  # no response tokens
    nll, ent, mask = token_nll_entropy(logits, labels)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none"
    )
    assert torch.allclose(nll, ref.view(3, 6), atol=1e-6)
    p = logits[:, :-1].softmax(-1)
    ref_ent = -(p * p.log()).sum(-1) * mask
    assert torch.allclose(ent, ref_ent, atol=1e-6)
    ppl, mean_ent = sample_ppl_entropy(nll, ent, mask)
    m = mask[0]
    assert ppl[0].item() == pytest.approx(math.exp(ref.view(3, 6)[0][m].mean().item()), rel=1e-6)
    assert mean_ent[1].item() == pytest.approx(ref_ent[1].mean().item(), rel=1e-6)
    assert torch.isnan(ppl[2]) and torch.isnan(mean_ent[2])
