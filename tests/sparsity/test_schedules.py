import itertools

import pytest

from prune_peft.sparsity import cubic_schedule, linear_schedule, sparsity_at


def test_cubic_matches_formula():
    T, w, c, pf, p0 = 100, 0.1, 0.1, 0.5, 0.0
    for t in range(T + 1):
        if t <= w * T:
            expected = p0
        elif t > T - c * T:
            expected = pf
        else:
            expected = pf + (p0 - pf) * (1 - (t - w * T) / (T - (w + c) * T)) ** 3
        assert cubic_schedule(t, T, pf, p0, w, c) == pytest.approx(expected, abs=1e-12)


def test_monotone_and_endpoints():
    vals = [cubic_schedule(t, 50, 0.6) for t in range(51)]
    assert vals[0] == 0.0 and vals[-1] == pytest.approx(0.6)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(vals))
    assert linear_schedule(25, 50, 0.6, warmup=0, cooldown=0) == pytest.approx(0.3)


def test_bad_schedule_args():
    with pytest.raises(ValueError, match="schedule must be one of"):
        sparsity_at("exp", 1, 10, 0.5)
    with pytest.raises(ValueError, match="total_steps"):
        cubic_schedule(1, 0, 0.5)
    with pytest.raises(ValueError, match="warmup"):
        cubic_schedule(1, 10, 0.5, warmup=0.6, cooldown=0.5)
