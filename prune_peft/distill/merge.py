"""SLERP merging of models fine-tuned from the same base (step 4 of the Cerebras self-distillation recipe).

Spherical linear interpolation (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985), applied
per tensor as in mergekit: with ``θ = arccos(v̂0 · v̂1)`` the angle between the flattened, normalised tensors,

    slerp(t; v0, v1) = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1

which follows the great circle instead of the chord, so the merged tensor's norm does not collapse between two
dissimilar models. When the tensors are (anti-)colinear (``|cos θ| > dot_threshold``) sin θ → 0 and the
formula is ill-conditioned; it falls back to ``lerp(t; v0, v1) = (1−t)·v0 + t·v1``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["lerp", "slerp", "slerp_models", "slerp_state_dicts"]

DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``(1−t)·v0 + t·v1``."""
    return (1 - t) * v0 + t * v1


def _check_t(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be a number in [0, 1], got {t!r}")
    return float(t)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two tensors of the same shape (treated as flat vectors); ``t=0`` → ``v0``.

    Coefficients are computed in float64 and the result is cast back to ``v0.dtype``; the endpoints are exact
    (``sin θ / sin θ == 1`` and ``sin 0 == 0`` in floating point).
    """
    t = _check_t(t)
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs tensors of the same shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    a, b = v0.detach().double(), v1.detach().double()
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:  # direction undefined for a zero tensor
        return lerp(t, a, b).to(v0.dtype)
    dot = float((a / na * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return lerp(t, a, b).to(v0.dtype)
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    s0 = torch.sin(theta - theta * t) / sin_theta
    s1 = torch.sin(theta * t) / sin_theta
    return (s0 * a + s1 * b).to(v0.dtype)


def _t_for(t: float | Mapping[str, float] | Callable[[str], float], name: str) -> float:
    if callable(t):
        return _check_t(t(name))
    if isinstance(t, Mapping):  # fnmatch patterns → t; the first matching pattern wins, "*" as default
        for pattern, value in t.items():
            if fnmatch.fnmatchcase(name, pattern):
                return _check_t(value)
        raise ValueError(f"no t pattern matches parameter {name!r}; add a '*' default (patterns: {list(t)})")
    return _check_t(t)


@torch.no_grad()
def slerp_state_dicts(
    sd0: Mapping[str, torch.Tensor],
    sd1: Mapping[str, torch.Tensor],
    t: float | Mapping[str, float] | Callable[[str], float] = 0.5,
    dot_threshold: float = DOT_THRESHOLD,
) -> dict[str, torch.Tensor]:
    """SLERP every floating tensor of two state dicts with the same keys and shapes.

    ``t`` is a number, a ``{glob pattern: t}`` mapping (first match wins; e.g. ``{"*self_attn*": 0.3, "*": 0.6}``)
    or a callable ``name → t``. Non-float tensors (integer buffers) must be equal and are copied.
    """
    missing0, missing1 = sorted(set(sd1) - set(sd0)), sorted(set(sd0) - set(sd1))
    if missing0 or missing1:
        raise ValueError(
            f"state dicts differ in keys: only in the second {missing0[:5]}, only in the first {missing1[:5]}"
        )
    merged: dict[str, torch.Tensor] = {}
    for name, a in sd0.items():
        b = sd1[name]
        if a.shape != b.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(a.shape)} in one model and {tuple(b.shape)} in the other"
            )
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise ValueError(f"non-float tensor {name!r} differs between the models and cannot be interpolated")
            merged[name] = a.clone()
            continue
        merged[name] = slerp(_t_for(t, name), a, b.to(a.device), dot_threshold)
    return merged


def slerp_models(
    model0: nn.Module,
    model1: nn.Module,
    t: float | Mapping[str, float] | Callable[[str], float] = 0.5,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    inplace: bool = False,
) -> nn.Module:
    """A model whose weights are ``slerp(t; model0, model1)`` tensor by tensor (a copy of ``model0`` by default).

    Both models must share the architecture (e.g. two students of the same pruned base fine-tuned on different
    distilled sets). PEFT models must be merged first (``merge_and_unload()``): interpolating the LoRA factors A
    and B separately is not an interpolation of the weight updates ``BA``.

    Example::

        merged = slerp_models(student_math.merge_and_unload(), student_chat.merge_and_unload(), t=0.5)
    """
    for m in (model0, model1):
        if hasattr(m, "peft_config"):
            raise ValueError("slerp_models needs plain models: call merge_and_unload() on PEFT models first")
    merged_sd = slerp_state_dicts(model0.state_dict(), model1.state_dict(), t, dot_threshold)
    out = model0 if inplace else copy.deepcopy(model0)
    out.load_state_dict(merged_sd)
    return out
