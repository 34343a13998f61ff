import itertools
import math

import pytest

from prune_peft.sparsity import cubic_schedule, linear_schedule, sparsity_at
from prune_peft.sparsity.loraprune import n_pruned
from prune_peft.sparsity.schedules import PruneSchedule, check_schedule_values, schedule_length


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


# ------------------------------------------------- PruneSchedule (moved from tests/tuners/loraprune/test_loraprune_math.py)


@pytest.mark.parametrize(
    "total,warmup,cooldown,every", [(100, 0.1, 0.1, 10), (37, 0.1, 0.2, 7), (10, 0.0, 0.0, 3), (5, 0.2, 0.3, 100)]
)
def test_schedule_ends_exactly_on_target(total, warmup, cooldown, every):
    sched = PruneSchedule(0.5, total, warmup=warmup, cooldown=cooldown, prune_every=every)
    events = sched.events()
    assert events and events[-1] == sched.final_step <= total
    assert sched.sparsity(events[-1]) == 0.5
    assert all(t > warmup * total for t in events)
    levels = [sched.sparsity(t) for t in events]
    assert levels == sorted(levels)
    # 32 heads at p_f = 0.5 end at exactly 16 pruned
    assert n_pruned(sched.sparsity(events[-1]), 32) == 16


def test_reference_rule_can_stop_one_group_short_ours_does_not():
    # the reference: events only while p(t) < p_f, count = int(n · p(t)); ours: final event at p_f, rounded
    total, every, p_f, n = 100, 10, 0.5, 32
    sched = PruneSchedule(p_f, total, prune_every=every)
    ref = max(int(n * sched.sparsity(t)) for t in range(1, total + 1) if t % every == 0 and sched.sparsity(t) < p_f)
    assert ref == 15  # one group short
    assert n_pruned(sched.sparsity(sched.events()[-1]), n) == 16


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="prune_every"):
        PruneSchedule(0.5, 10, prune_every=0)
    with pytest.raises(ValueError, match="target_sparsity"):
        PruneSchedule(1.0, 10)
    with pytest.raises(ValueError, match="warmup"):
        PruneSchedule(0.5, 10, warmup=0.6, cooldown=0.5)
    assert math.isclose(PruneSchedule(0.5, 10, warmup=0, cooldown=0, kind="linear").sparsity(5), 0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_sparsity=True), "target_sparsity"),
        (dict(target_sparsity=0.3, initial_sparsity=0.5), "initial_sparsity"),
        (dict(cooldown=-0.1), "cooldown"),
        (dict(prune_every=2.0), "prune_every"),
        (dict(schedule="constant"), "schedule"),
        (dict(schedule_steps=True), "schedule_steps"),
    ],
)
def test_check_schedule_values_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_schedule_values(**kwargs)


def test_schedule_length_needs_one_source_and_must_fit():
    assert schedule_length(None, 20, "x") == 20
    assert schedule_length(8, 20, "x") == 8
    assert schedule_length(8, None, "x") == 8
    with pytest.raises(ValueError, match="longer than training"):
        schedule_length(30, 20, "x")
    with pytest.raises(ValueError, match="needs its length"):
        schedule_length(None, None, "x")
    with pytest.raises(ValueError, match="total_steps"):
        schedule_length(None, 0, "x")
    settings = dict(target_sparsity=0.5, initial_sparsity=0.0, warmup=0.0, cooldown=0.0, prune_every=1,
                    schedule="linear", schedule_steps=None)  # fmt: skip
    sched = PruneSchedule.from_settings(settings, 10, "x")
    assert sched.total == 10 and math.isclose(sched.sparsity(5), 0.25)
    # the schedule's values are the pure schedule functions' values (one dispatch)
    assert sched.sparsity(3) == linear_schedule(3, 10, 0.5, 0.0, 0.0, 0.0)
    assert PruneSchedule(0.5, 100).sparsity(40) == cubic_schedule(40, 100, 0.5)
