"""Statistics for benchmarks/quality.py: bootstrap intervals over seeds × evaluation windows, paired differences and
the one-line verdict.

Every measurement is an array ``[seeds, windows]`` (one value per training seed and held-out evaluation window, e.g.
the mean token NLL of a window). The interval is a two-stage (hierarchical) bootstrap: resample seeds with
replacement, then windows with replacement within each drawn seed, and take the mean; the 2.5 % and 97.5 %
quantiles of those means are the 95 % interval. Seeds carry the training noise, windows the evaluation noise, so
both enter the interval. Two arms evaluated on the same seeds and windows are compared by bootstrapping their
*paired* difference array the same way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VERDICTS", "bootstrap_ci", "paired_diff_ci", "ratio_ci", "verdict"]

VERDICTS = ("reproduces the paper's direction", "no significant difference", "contradicts")


def _as_2d(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]  # one value per seed
    if x.ndim != 2 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name} must be a non-empty finite [seeds, windows] (or [seeds]) array, got shape {x.shape}")
    return x


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    s, w = x.shape
    seeds = rng.integers(0, s, size=(n_boot, s))
    windows = rng.integers(0, w, size=(n_boot, s, w))
    return x[seeds[:, :, None], windows].mean(axis=(1, 2))


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean of a ``[seeds, windows]`` array and its ``level`` percentile interval by the two-stage bootstrap."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    x = _as_2d(values, "values")
    means = _boot_means(x, n_boot, np.random.default_rng(seed))
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return {
        "mean": float(x.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "level": level,
        "seeds": x.shape[0],
        "windows": x.shape[1],
    }


def paired_diff_ci(a, b, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> dict:
    """Interval of mean(a − b) for two arms measured on the same seeds and windows (paired element by element)."""
    xa, xb = _as_2d(a, "a"), _as_2d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must be paired (same [seeds, windows] shape), got {xa.shape} and {xb.shape}")
    return bootstrap_ci(xa - xb, level, n_boot, seed)


def ratio_ci(num, den, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> dict:
    """mean(num) / mean(den) of two paired ``[seeds, windows]`` arrays and its interval, both resampled with the
    same two-stage draws (e.g. the fraction of a gap recovered: num = pruned − tuned, den = pruned − dense). A ratio
    of means, not a mean of per-window ratios, so windows with a tiny denominator do not dominate."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    xn, xd = _as_2d(num, "num"), _as_2d(den, "den")
    if xn.shape != xd.shape:
        raise ValueError(f"num and den must be paired (same [seeds, windows] shape), got {xn.shape} and {xd.shape}")
    if xd.mean() == 0:
        raise ValueError("den must have a non-zero mean (the gap the ratio is measured against)")
    rng = np.random.default_rng(seed)
    s, w = xn.shape
    seeds = rng.integers(0, s, size=(n_boot, s))[:, :, None]
    windows = rng.integers(0, w, size=(n_boot, s, w))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = xn[seeds, windows].mean(axis=(1, 2)) / xd[seeds, windows].mean(axis=(1, 2))
    ratios = ratios[np.isfinite(ratios)]
    a = (1 - level) / 2
    lo, hi = np.quantile(ratios, [a, 1 - a])
    return {
        "mean": float(xn.mean() / xd.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "level": level,
        "seeds": s,
        "windows": w,
    }


def verdict(diff: dict, expected: str) -> str:
    """One line from a difference interval (method − baseline) and the sign the paper predicts:
    ``expected="lower"`` (e.g. the method's loss is lower) or ``"higher"``. The interval excluding 0 on the
    predicted side reproduces the paper's direction, on the other side contradicts it; otherwise no significant
    difference."""
    if expected not in ("lower", "higher"):
        raise ValueError(f"expected must be 'lower' or 'higher', got {expected!r}")
    if diff["lo"] <= 0 <= diff["hi"]:
        return VERDICTS[1]
    below = diff["hi"] < 0
    return VERDICTS[0] if below == (expected == "lower") else VERDICTS[2]
