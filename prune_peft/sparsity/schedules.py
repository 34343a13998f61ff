"""Sparsity schedules over optimizer steps (pure functions).

Cubic (Zhu & Gupta 2017; LoRAPrune's `schedule_sparsity_ratio`), with warmup fraction w and cooldown c of T:

    p(t) = p0                                               t ≤ wT
    p(t) = p_f                                              t > T − cT
    p(t) = p_f + (p0 − p_f)·(1 − (t − wT)/(T − (w+c)T))³    otherwise
"""

from __future__ import annotations

__all__ = ["SCHEDULES", "constant_schedule", "cubic_schedule", "linear_schedule", "sparsity_at"]


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
