"""OWL (Yin et al., 2023, arXiv 2310.05175) against plain-torch oracles written from the formulas:
LOD_l = mean(S > M·mean(S)) over the layer's pooled Wanda scores; s_l = s − (n_l − n̄), n_l = 2λ·minmax(D)_l."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_peft.sparsity.masks import keep_top, keep_top_per_row
from prune_peft.sparsity.owl import (
    check_owl_args,
    largest_remainder,
    layer_outlier_ratio,
    owl_layer_sparsities,
    owl_prune_counts,
    spread_over_rows,
)


def _lod_oracle(mats, m):
    flat = torch.cat([x.flatten().double() for x in mats])
    return (flat > m * flat.mean()).double().mean().item()


def _alloc_oracle(ratios, s, lam, weights=None):
    """The authors' rule (lib/prune_all.py, prune_wanda_outlier), with the plain mean replaced by a weighted one."""
    r = [float(x) for x in ratios]
    w = [1.0] * len(r) if weights is None else [float(x) for x in weights]
    lo, hi = min(r), max(r)
    n = [(x - lo) / (hi - lo) * 2 * lam for x in r]
    nbar = sum(a * b for a, b in zip(w, n)) / sum(w)
    density = [x - nbar + (1 - s) for x in n]
    return [1 - d for d in density]


def test_layer_outlier_ratio_matches_oracle_and_pools_matrices():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(8, 16, generator=g).abs() ** 3, torch.randn(4, 16, generator=g).abs()]
    for m in (1.0, 2.0, 5.0):
        assert layer_outlier_ratio(mats, m) == pytest.approx(_lod_oracle(mats, m), abs=0)
    # pooled, not averaged per matrix: the heavy-tailed matrix dominates the threshold
    per_matrix = sum(_lod_oracle([x], 2.0) for x in mats) / 2
    assert layer_outlier_ratio(mats, 2.0) != pytest.approx(per_matrix)


def test_layer_outlier_ratio_hand_case():
    # mean = (1+1+1+1+16)/5 = 4; M=3 → threshold 12; one of five above
    assert layer_outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0]), 3.0) == pytest.approx(0.2)
    assert layer_outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0]), 5.0) == 0.0


@pytest.mark.parametrize("s,lam", [(0.5, 0.08), (0.7, 0.08), (0.5, 0.2)])
def test_allocation_matches_authors_rule_and_mean_is_exact(s, lam):
    ratios = [0.01, 0.03, 0.02, 0.08, 0.015, 0.05]
    got = owl_layer_sparsities(ratios, s, lam)
    want = _alloc_oracle(ratios, s, lam)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64))
    assert sum(got) / len(got) == pytest.approx(s, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    # more outliers → lower sparsity
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [got[i] for i in order] == sorted(got, reverse=True)


def test_weighted_mean_is_exact_for_unequal_layers():
    ratios, weights = [0.01, 0.05, 0.02], [100, 300, 50]
    got = owl_layer_sparsities(ratios, 0.6, 0.1, weights)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(_alloc_oracle(ratios, 0.6, 0.1, weights)).float())
    assert sum(w * x for w, x in zip(weights, got)) / sum(weights) == pytest.approx(0.6, abs=1e-12)
    # the plain mean is not the target here: the weights matter
    assert sum(got) / 3 != pytest.approx(0.6, abs=1e-6)


def test_equal_ratios_or_zero_lambda_give_uniform():
    assert owl_layer_sparsities([0.02, 0.02, 0.02], 0.5, 0.08) == [0.5] * 3
    assert owl_layer_sparsities([0.01, 0.02, 0.03], 0.5, 0.0) == [0.5] * 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=0.5, m=0, lam=0.08), "owl_m"),
        (dict(sparsity=0.5, m=-1.0, lam=0.08), "owl_m"),
        (dict(sparsity=0.5, m=float("inf"), lam=0.08), "owl_m"),
        (dict(sparsity=0.5, m=5, lam=-0.01), "owl_lambda"),
        (dict(sparsity=0.5, m=5, lam=0.25), r"owl_lambda.*\[0, 0.25\)"),
        (dict(sparsity=0.9, m=5, lam=0.08), r"owl_lambda.*\[0, 0.05\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_owl_args(**kwargs)


def test_bad_inputs_to_pure_functions():
    with pytest.raises(ValueError, match="scores"):
        layer_outlier_ratio([])
    with pytest.raises(ValueError, match="m must be"):
        layer_outlier_ratio(torch.ones(3), 0)
    with pytest.raises(ValueError, match="outlier_ratios"):
        owl_layer_sparsities([], 0.5)
    with pytest.raises(ValueError, match="weights"):
        owl_layer_sparsities([0.1, 0.2], 0.5, 0.08, [1, 0])


# ------------------------------------------------------------------------------ integer counts (exact mean)


def test_largest_remainder_hand_case():
    # quotas 1.6, 1.3, 2.1 (Σ 5): floors 1, 1, 2 → one unit left → the largest fraction (0.6)
    assert largest_remainder([1.6, 1.3, 2.1], 5) == [2, 1, 2]
    # rescaled to the total: 10 × (1, 1, 1)/3 = 3.33… each; the extra unit goes to the first (tie → lower index)
    assert largest_remainder([1.0, 1.0, 1.0], 10) == [4, 3, 3]
    assert largest_remainder([0.0, 2.0], 3) == [0, 3]
    assert largest_remainder([0.5, 0.5], 0) == [0, 0]


@settings(max_examples=60, deadline=None)
@given(
    quotas=st.lists(st.floats(0.01, 1e6, allow_nan=False), min_size=1, max_size=12),
    total=st.integers(0, 10**7),
)
def test_largest_remainder_sums_exactly_and_stays_within_one(quotas, total):
    got = largest_remainder(quotas, total)
    assert sum(got) == total
    exact = [Fraction(q) for q in quotas]
    for k, q in zip(got, exact):
        share = q * total / sum(exact)
        assert math.floor(share) <= k <= math.ceil(share)


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0.0, 0.2, allow_nan=False), min_size=2, max_size=10),
    sizes_seed=st.integers(0, 2**16),
    s=st.sampled_from([0.3, 0.5, 0.6, 0.7]),
)
def test_owl_prune_counts_total_is_the_rounded_target(ratios, sizes_seed, s):
    sizes = torch.randint(50, 5000, (len(ratios),), generator=torch.Generator().manual_seed(sizes_seed)).tolist()
    frac = owl_layer_sparsities(ratios, s, 0.08, sizes)
    counts = owl_prune_counts(frac, sizes, s)
    assert sum(counts) == math.floor(s * sum(sizes) + 0.5)
    for k, f, w in zip(counts, frac, sizes):
        assert 0 <= k <= w and abs(k - f * w) < 1.01  # within one weight of the layer's fractional target


def test_owl_prune_counts_fixes_the_floor_shortfall():
    # three layers of 1000 at 0.4994, 0.5012, 0.4994 (weighted mean 0.5): quotas 499.4, 501.2, 499.4 → the per-
    # layer floor prunes 1499 of 1500; the largest remainders add the missing one (to the first of the tied 0.4)
    frac = [0.4994, 0.5012, 0.4994]
    assert sum(math.floor(f * 1000) for f in frac) == 1499
    assert owl_prune_counts(frac, [1000, 1000, 1000], 0.5) == [500, 501, 499]
    # halves round up: s·N = 0.5 × 3 = 1.5 → 2
    assert sum(owl_prune_counts([0.5], [3], 0.5)) == 2


@pytest.mark.parametrize("count,rows,want", [(10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]), (3, 5, [1, 1, 1, 0, 0])])
def test_spread_over_rows_hand_cases(count, rows, want):
    assert spread_over_rows(count, rows, 8).tolist() == want


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), frac=st.floats(0.0, 1.0))
def test_spread_over_rows_sums_and_differs_by_at_most_one(rows, cols, frac):
    count = int(frac * rows * cols)
    got = spread_over_rows(count, rows, cols)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert int(got.sum()) == count and int(got.max() - got.min()) <= 1 and int(got.max()) <= cols
    assert torch.equal(got, got.sort(descending=True).values)  # the extra ones go to the first rows


def test_keep_top_per_row_matches_per_row_oracle_and_keep_top():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 10, generator=g)
    scores[0, 3] = scores[0, 7]  # a tie: the lower index is kept first
    n_keep = torch.tensor([0, 10, 3, 4, 5, 9])
    got = keep_top_per_row(scores, n_keep)
    for r in range(6):
        order = sorted(range(10), key=lambda j: (-float(scores[r, j]), j))
        want = torch.zeros(10, dtype=torch.bool)
        want[order[: int(n_keep[r])]] = True
        assert torch.equal(got[r], want), r
    assert got.sum(1).tolist() == n_keep.tolist()
    assert torch.equal(keep_top_per_row(scores, torch.full((6,), 4)), keep_top(scores, 4))


def test_bad_inputs_to_count_functions():
    with pytest.raises(ValueError, match="quotas"):
        largest_remainder([], 3)
    with pytest.raises(ValueError, match="quotas"):
        largest_remainder([1.0, -1.0], 3)
    with pytest.raises(ValueError, match="total"):
        largest_remainder([1.0], -1)
    with pytest.raises(ValueError, match="quotas must not all be 0"):
        largest_remainder([0.0, 0.0], 1)
    with pytest.raises(ValueError, match="sizes"):
        owl_prune_counts([0.5, 0.5], [10], 0.5)
    with pytest.raises(ValueError, match="sizes"):
        owl_prune_counts([0.5], [0], 0.5)
    with pytest.raises(ValueError, match="layer_sparsities"):
        owl_prune_counts([1.2], [10], 0.5)
    with pytest.raises(ValueError, match=r"count must be an integer in \[0, 12\]"):
        spread_over_rows(13, 3, 4)
    with pytest.raises(ValueError, match="rows"):
        spread_over_rows(1, 0, 4)
    with pytest.raises(ValueError, match="n_keep"):
        keep_top_per_row(torch.zeros(2, 3), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="n_keep"):
        keep_top_per_row(torch.zeros(2, 3), torch.tensor([1]))
