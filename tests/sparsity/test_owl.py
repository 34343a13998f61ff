"""OWL (Yin et al., 2023, arXiv 2310.05175) against plain-torch oracles written from the formulas:
LOD_l = mean(S > M·mean(S)) over the layer's pooled Wanda scores; s_l = s − (n_l − n̄), n_l = 2λ·minmax(D)_l."""

import pytest
import torch

from prune_peft.sparsity.owl import check_owl_args, layer_outlier_ratio, owl_layer_sparsities


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
