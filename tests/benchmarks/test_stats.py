"""benchmarks/_stats.py against numpy oracles: the two-stage bootstrap, paired differences and verdicts."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _stats import VERDICTS, bootstrap_ci, paired_diff_ci, ratio_ci, verdict


def test_mean_and_degenerate_interval():
    x = np.full((3, 5), 2.5)
    ci = bootstrap_ci(x)
    assert ci["mean"] == ci["lo"] == ci["hi"] == 2.5 and ci["seeds"] == 3 and ci["windows"] == 5
    y = np.arange(12.0).reshape(3, 4)
    ci = bootstrap_ci(y)
    assert ci["mean"] == pytest.approx(y.mean()) and ci["lo"] < y.mean() < ci["hi"]


def test_interval_matches_normal_theory_for_iid_windows():
    """One seed, many iid windows: the bootstrap interval ≈ mean ± 1.96·sd/√n (oracle from numpy)."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=(1, 400))
    ci = bootstrap_ci(x, n_boot=8000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert ci["lo"] == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert ci["hi"] == pytest.approx(x.mean() + half, abs=0.2 * half)


def test_seed_variance_widens_the_interval():
    """Same window noise, but seeds that disagree: the interval must reflect the between-seed spread."""
    rng = np.random.default_rng(2)
    windows = rng.normal(0, 0.1, size=(4, 50))
    tight = bootstrap_ci(windows)
    spread = bootstrap_ci(windows + np.array([[-1.0], [1.0], [-0.5], [0.5]]))
    assert (spread["hi"] - spread["lo"]) > 5 * (tight["hi"] - tight["lo"])


def test_paired_difference_known_and_null():
    rng = np.random.default_rng(3)
    base = rng.normal(4.0, 1.0, size=(3, 40))  # shared window difficulty: pairing removes it
    better = base - 0.2 + rng.normal(0, 0.02, size=base.shape)
    d = paired_diff_ci(better, base)
    assert d["mean"] == pytest.approx(-0.2, abs=0.01) and d["hi"] < 0
    assert verdict(d, "lower") == VERDICTS[0]
    assert verdict(d, "higher") == VERDICTS[2]
    same = base + rng.normal(0, 0.02, size=base.shape)
    n = paired_diff_ci(same, base)
    assert n["lo"] < 0 < n["hi"]
    assert verdict(n, "lower") == verdict(n, "higher") == VERDICTS[1]
    # unpaired, the same 0.2 shift is hidden by the window spread (sd 1): pairing is what makes it visible
    a, b = bootstrap_ci(better), bootstrap_ci(base)
    assert a["hi"] > b["lo"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="paired"):
        paired_diff_ci(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected"):
        verdict({"lo": -1, "hi": 1}, "down")


def test_ratio_ci_is_ratio_of_means_with_shared_draws():
    rng = np.random.default_rng(3)
    den = rng.normal(1.0, 0.1, size=(3, 8))
    r = ratio_ci(0.6 * den, den)  # exactly proportional: every draw gives 0.6
    assert r["mean"] == pytest.approx(0.6) and r["lo"] == pytest.approx(0.6) and r["hi"] == pytest.approx(0.6)
    num = 0.5 * den + rng.normal(0, 0.05, size=(3, 8))
    r = ratio_ci(num, den)
    assert r["mean"] == pytest.approx(num.mean() / den.mean()) and r["lo"] < r["mean"] < r["hi"]
    with pytest.raises(ValueError, match="paired"):
        ratio_ci(num, den[:2])
    with pytest.raises(ValueError, match="non-zero mean"):
        ratio_ci(num, np.zeros((3, 8)))
