"""Sparsity schedules over optimizer steps: pure functions, and the one schedule object every pruner uses.

Cubic (Zhu & Gupta 2017; LoRAPrune's `schedule_sparsity_ratio`), with warmup fraction w and cooldown c of T:

    p(t) = p0                                               t ≤ wT
    p(t) = p_f                                              t > T − cT
    p(t) = p_f + (p0 − p_f)·(1 − (t − wT)/(T − (w+c)T))³    otherwise

:class:`PruneSchedule` adds the pruning events (every ``prune_every`` steps, the last one landing exactly on the
target); :func:`check_schedule_values` is the single validation of its settings, shared by ``LoRAPruneConfig``, the
LoRAPrune tuner, ``PruneCallback`` and its magnitude driver.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "PRUNE_SCHEDULES",
    "SCHEDULES",
    "SCHEDULE_KEYS",
    "PruneSchedule",
    "check_schedule_values",
    "constant_schedule",
    "cubic_schedule",
    "linear_schedule",
    "schedule_length",
    "sparsity_at",
]


def _check(total_steps: int, warmup: float, cooldown: float) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
    if not (0 <= warmup < 1 and 0 <= cooldown < 1 and warmup + cooldown < 1):
        raise ValueError(f"warmup and cooldown must be in [0, 1) with warmup + cooldown < 1, got {warmup}, {cooldown}")


def _progress(step: int, total_steps: int, warmup: float, cooldown: float) -> float:
    _check(total_steps, warmup, cooldown)
    start, end = warmup * total_steps, total_steps - cooldown * total_steps
    if step <= start:
        return 0.0
    if step > end:
        return 1.0
    return min(1.0, (step - start) / (end - start))


def cubic_schedule(
    step: int, total_steps: int, final: float, initial: float = 0.0, warmup: float = 0.1, cooldown: float = 0.1
) -> float:
    frac = _progress(step, total_steps, warmup, cooldown)
    return final + (initial - final) * (1.0 - frac) ** 3


def linear_schedule(
    step: int, total_steps: int, final: float, initial: float = 0.0, warmup: float = 0.1, cooldown: float = 0.1
) -> float:
    frac = _progress(step, total_steps, warmup, cooldown)
    return initial + (final - initial) * frac


def constant_schedule(
    step: int, total_steps: int, final: float, initial: float = 0.0, warmup: float = 0.1, cooldown: float = 0.1
) -> float:
    _check(total_steps, warmup, cooldown)
    return final


SCHEDULES = {"cubic": cubic_schedule, "linear": linear_schedule, "constant": constant_schedule}


def sparsity_at(kind: str, step: int, total_steps: int, final: float, **kwargs) -> float:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {kind!r}")
    return SCHEDULES[kind](step, total_steps, final, **kwargs)


# ------------------------------------------------------------------------------------------------- pruning events

PRUNE_SCHEDULES = ("cubic", "linear")
SCHEDULE_KEYS = (
    "target_sparsity",
    "initial_sparsity",
    "warmup",
    "cooldown",
    "prune_every",
    "schedule",
    "schedule_steps",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_schedule_values(
    *,
    target_sparsity: float | None = None,
    initial_sparsity: float | None = None,
    warmup: float | None = None,
    cooldown: float | None = None,
    prune_every: int | None = None,
    schedule: str | None = None,
    schedule_steps: int | None = None,
) -> None:
    """ValueError naming the field, its value and what is allowed, for bad schedule settings (None = not given)."""
    p = target_sparsity
    if p is not None and (not _is_number(p) or not 0 <= p < 1):
        raise ValueError(f"target_sparsity must be in [0, 1), got {p!r}")
    p0 = initial_sparsity
    if p0 is not None and (not _is_number(p0) or not 0 <= p0 <= (p if p is not None else 1)):
        raise ValueError(f"initial_sparsity must be in [0, target_sparsity={p}], got {p0!r}")
    for name, v in (("warmup", warmup), ("cooldown", cooldown)):
        if v is not None and (not _is_number(v) or not 0 <= v < 1):
            raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}")
    if warmup is not None and cooldown is not None and warmup + cooldown >= 1:
        raise ValueError(f"warmup + cooldown must be < 1, got warmup={warmup!r} + cooldown={cooldown!r}")
    if prune_every is not None and (not _is_int(prune_every) or prune_every <= 0):
        raise ValueError(f"prune_every must be a positive integer, got {prune_every!r}")
    if schedule is not None and schedule not in PRUNE_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(PRUNE_SCHEDULES)}, got {schedule!r}")
    if schedule_steps is not None and (not _is_int(schedule_steps) or schedule_steps <= 0):
        raise ValueError(f"schedule_steps must be a positive integer or None, got {schedule_steps!r}")


def schedule_length(schedule_steps: int | None, total_steps: int | None, owner: str) -> int:
    """The schedule length T: ``schedule_steps`` when set (it must fit in ``total_steps``), else ``total_steps``."""
    if total_steps is not None and (not _is_int(total_steps) or total_steps <= 0):
        raise ValueError(f"{owner}: total_steps must be a positive integer (optimizer steps), got {total_steps!r}")
    if schedule_steps is None and total_steps is None:
        raise ValueError(
            f"{owner}: the pruning schedule needs its length in optimizer steps; set schedule_steps in the config "
            "or pass total_steps (PruneCallback passes the Trainer's max_steps)"
        )
    if schedule_steps is not None and total_steps is not None and schedule_steps > total_steps:
        raise ValueError(
            f"{owner}: schedule_steps={schedule_steps} is longer than training (total_steps={total_steps}); the "
            "target sparsity would never be reached. Lower schedule_steps (or leave it unset to use total_steps)."
        )
    return schedule_steps or total_steps


class PruneSchedule:
    """Sparsity over optimizer steps t = 1..T with LoRAPrune's warmup/cooldown and pruning events.

    Events fire at steps ``t`` with ``warmup·T < t ≤ t_final`` and ``t % prune_every == 0``, and always at
    ``t_final = ⌈T − cooldown·T⌉`` — the first step where the schedule equals the target, so the final event
    lands exactly on it (the reference requires p(t) < p_final and can stop one group short).

    >>> PruneSchedule(0.5, 100, prune_every=10).events()[-1]
    90
    """

    def __init__(self, target: float, total: int, *, initial: float = 0.0, warmup: float = 0.1,
                 cooldown: float = 0.1, prune_every: int = 10, kind: str = "cubic") -> None:  # fmt: skip
        check_schedule_values(target_sparsity=target, initial_sparsity=initial, warmup=warmup, cooldown=cooldown,
                              prune_every=prune_every, schedule=kind)  # fmt: skip
        if not _is_int(total) or total <= 0:
            raise ValueError(f"the schedule needs a positive number of optimizer steps, got total={total!r}")
        self.target, self.total, self.initial = float(target), total, float(initial)
        self.warmup, self.cooldown, self.every, self.kind = warmup, cooldown, prune_every, kind
        self.start = warmup * total
        self.final_step = max(1, math.ceil(total - cooldown * total - 1e-9))

    @classmethod
    def from_settings(cls, settings: dict[str, Any], total_steps: int | None, owner: str) -> PruneSchedule:
        """Validate ``settings`` (the :data:`SCHEDULE_KEYS`) once and build the schedule over the run's length."""
        check_schedule_values(**{k: settings.get(k) for k in SCHEDULE_KEYS})
        total = schedule_length(settings.get("schedule_steps"), total_steps, owner)
        return cls(
            settings["target_sparsity"], total, initial=settings.get("initial_sparsity") or 0.0,
            warmup=settings["warmup"], cooldown=settings["cooldown"], prune_every=settings["prune_every"],
            kind=settings["schedule"],
        )  # fmt: skip

    def sparsity(self, step: int) -> float:
        if step >= self.final_step:
            return self.target
        return sparsity_at(self.kind, step, self.total, self.target, initial=self.initial, warmup=self.warmup,
                           cooldown=self.cooldown)  # fmt: skip

    def is_event(self, step: int) -> bool:
        if step == self.final_step:
            return True
        return self.start < step < self.final_step and step % self.every == 0

    def events(self) -> list[int]:
        return [t for t in range(1, self.final_step + 1) if self.is_event(t)]
