"""PruneCallback drivers: the interface, the registry, and the built-in drivers.

One driver object per thing being pruned, chosen through a small registry::

    class MyDriver(PruneDriver):
        name = "my-method"                        # registry key; PruneCallback(method="my-method") selects it
        auto = True                               # found by PruneCallback() without arguments
        overrides = ("target_sparsity", ...)      # PruneCallback keyword arguments this driver accepts

        @classmethod
        def discover(cls, model, **overrides) -> list["PruneDriver"]: ...   # drivers for what is on the model
        def setup(self, model, args, state) -> None: ...        # validate (ValueError) before the first step
        def accumulate(self, model, state) -> None: ...         # on_pre_optimizer_step (grads present)
        def update(self, model, state) -> None: ...             # on_optimizer_step (after optimizer.step())
        def metrics(self) -> dict[str, float]: ...              # logged at every logging step
        def state_dict(self) -> dict: ...                       # JSON-able resume state
        def load_state_dict(self, state: dict) -> None: ...
        def tensors(self) -> dict[str, torch.Tensor]: ...       # large resume tensors (side file), optional
        def load_tensors(self, tensors) -> None: ...
        def on_save(self, model, args, state) -> None: ...      # invariant checks at checkpoint time

    register_driver(MyDriver)   # or register_driver(MyDriver, name="alias")

Built-in: ``"loraprune"`` (delegates to the LoRAPrune tuner's ``update_importance`` / ``update_and_allocate``),
``"sparse-adapter"`` (SparseLoRA / SPP: logs their sparsity, checks at every save that the base still has the zeros
the adapter was made for), ``"magnitude"`` (gradual magnitude pruning of plain models).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..sparsity.loraprune import n_pruned, prune_lowest
from ..sparsity.masks import parse_pattern
from ..sparsity.schedules import SCHEDULE_KEYS, PruneSchedule, check_schedule_values
from ..tuners.loraprune.pruner import OVERRIDABLE, LoRAPruner, broadcast_masks, check_sharding

__all__ = ["DRIVERS", "LoRAPruneDriver", "MagnitudeDriver", "PruneDriver", "SparseAdapterDriver", "register_driver"]

DRIVERS: dict[str, type[PruneDriver]] = {}


def register_driver(cls: type[PruneDriver], name: str | None = None) -> type[PruneDriver]:
    """Add a driver class to the registry (usable as a decorator); a re-registration replaces the old class."""
    key = name or cls.name
    if not key or not isinstance(key, str):
        raise ValueError(f"driver {cls.__name__} needs a non-empty string name")
    DRIVERS[key] = cls
    return cls


class PruneDriver:
    """Base class of PruneCallback drivers; every hook is optional (see the module docstring)."""

    name: ClassVar[str] = ""
    auto: ClassVar[bool] = True
    overrides: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        return []

    def setup(self, model: nn.Module, args, state) -> None:
        pass

    def accumulate(self, model: nn.Module, state) -> None:
        pass

    def update(self, model: nn.Module, state) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def on_save(self, model: nn.Module, args, state) -> None:
        pass

    @property
    def key(self) -> str:
        """Unique key of this driver instance in checkpoints and metrics."""
        return self.name


def _max_steps(state, owner: str) -> int:
    max_steps = int(getattr(state, "max_steps", 0) or 0)
    if max_steps <= 0:
        raise ValueError(f"{owner}: the Trainer reports max_steps={max_steps}; the pruning schedule needs it")
    return max_steps


def _find(model: nn.Module, cls: type) -> list:
    return [m for m in model.modules() if isinstance(m, cls)]


# ------------------------------------------------------------------------------------------------ LoRAPrune


class LoRAPruneDriver(PruneDriver):
    """Delegates one LoRAPrune adapter to its tuner: the algorithm, schedule and state live in the tuner.

    ``on_pre_optimizer_step`` → ``tuner.update_importance(global_step)`` (gradients of the whole accumulated,
    all-reduced, clipped step, scored against the weights they belong to); ``on_optimizer_step`` →
    ``tuner.update_and_allocate(global_step)`` (masks on the schedule).
    """

    name = "loraprune"
    overrides = OVERRIDABLE

    def __init__(self, tuner, adapter: str, **overrides: Any) -> None:
        if "structure" in overrides:
            raise ValueError("loraprune: structure is fixed when the adapter is created (LoRAPruneConfig.structure)")
        self.tuner, self.adapter, self.overrides = tuner, adapter, dict(overrides)
        self.pruner: LoRAPruner | None = None

    @property
    def key(self) -> str:
        return f"loraprune:{self.adapter}"

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        from ..tuners.loraprune import LoRAPruneModel

        return [cls(t, a, **overrides) for t in _find(model, LoRAPruneModel) for a in t.peft_config]

    def setup(self, model: nn.Module, args, state) -> None:
        check_sharding(model)  # the wrapped model (FSDP1 wrappers sit outside the tuner); FSDP2 row shards pass
        total = _max_steps(state, "loraprune")
        self.tuner.prepare_pruning(total, adapter=self.adapter, **self.overrides)
        self.pruner = self.tuner.pruner(self.adapter)

    def accumulate(self, model: nn.Module, state) -> None:
        self.tuner.update_importance(state.global_step, adapter=self.adapter)

    def update(self, model: nn.Module, state) -> None:
        self.tuner.update_and_allocate(state.global_step, adapter=self.adapter)

    @property
    def importance(self) -> dict[str, torch.Tensor]:
        return self.pruner.importance if self.pruner is not None else {}

    @property
    def last_step(self) -> int:
        return self.pruner.last_step if self.pruner is not None else 0

    def metrics(self) -> dict[str, float]:
        return self.pruner.metrics() if self.pruner is not None else {}

    def _structured(self) -> bool:
        return self.tuner.peft_config[self.adapter].structured

    def state_dict(self) -> dict:
        state = self.pruner.state_dict()
        importance = state.pop("importance")
        if self._structured():  # small: per-block vectors, exact through JSON (float32 → double → float32)
            state["importance"] = {k: v.tolist() for k, v in importance.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._structured() else dict(self.pruner.importance)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self._structured():
            self.pruner.load_state_dict({**self.pruner.state_dict(), "importance": tensors})


register_driver(LoRAPruneDriver)


# ---------------------------------------------------------------------------------------- sparse adapter monitor


class SparseAdapterDriver(PruneDriver):
    """SparseLoRA / SPP adapters: their masks are fixed, so this logs their sparsity and checks it at every save."""

    name = "sparse-adapter"
    overrides = ()

    def __init__(self, tuner, adapter: str) -> None:
        self.tuner, self.adapter = tuner, adapter
        self._summary: dict[str, float] = {}

    @property
    def key(self) -> str:
        return f"sparse-adapter:{self.adapter}"

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        from ..tuners._base import SparseTunerMixin

        return [cls(t, a) for t in _find(model, SparseTunerMixin) for a in t.peft_config]

    def setup(self, model, args, state) -> None:
        self._summary = self._measure()

    def _measure(self) -> dict[str, float]:
        from ..sparsity.masks import describe_pattern
        from ..tuners._base import sparse_layers

        zeros = numel = 0
        masks = []
        for layer in sparse_layers(self.tuner.model).values():
            if self.adapter in layer.lora_sparse_mask:
                mask = layer.sparse_mask(self.adapter)
                masks.append(mask)
                zeros += int((~mask).sum())
                numel += mask.numel()
        pattern = describe_pattern(masks)
        out = {"prune/sparse_adapter_sparsity": zeros / max(numel, 1)}
        if pattern != "unstructured":
            out[f"prune/sparse_adapter_{pattern}_valid"] = 1.0
        return out

    def metrics(self) -> dict[str, float]:
        return dict(self._summary)

    def on_save(self, model, args, state) -> None:
        from ..tuners._base import sparse_layers

        for name, layer in sparse_layers(self.tuner.model).items():
            if self.adapter in layer.lora_sparse_mask and not layer.merged:
                problem = layer.mask_problem(self.adapter)
                if problem:
                    raise RuntimeError(
                        f"{self.tuner.method}: at checkpoint step {state.global_step}, {name} no longer matches the "
                        f"adapter's mask: {problem}. Something modified the frozen base weights during training."
                    )


register_driver(SparseAdapterDriver)


# -------------------------------------------------------------------------------------------- gradual magnitude


class MagnitudeDriver(PruneDriver):
    """Gradual magnitude pruning of the decoder-block linears of a model without adapters (full fine-tuning).

    Masks are the weights' own zeros (re-derived as ``W != 0`` on resume): at each event the lowest-|W| surviving
    weights of every layer are zeroed (``"unstructured"``) or k of every M (``"N:M"``, k growing to M − N); after
    every optimizer step the pruned weights are re-zeroed and their gradients dropped before the step.
    """

    name = "magnitude"
    auto = False
    overrides = (*SCHEDULE_KEYS, "structure", "include", "exclude")

    def __init__(self, **overrides: Any) -> None:
        if overrides.get("target_sparsity") is None and parse_pattern(overrides.get("structure")) is None:
            raise ValueError("PruneCallback(method='magnitude') needs target_sparsity=... (or structure='N:M')")
        structure = overrides.get("structure") or "unstructured"
        self.nm = parse_pattern(structure, arg="structure")
        target = overrides.get("target_sparsity")
        if self.nm is not None:
            if target is not None and abs(target - self.nm.sparsity) > 1e-9:
                raise ValueError(f"target_sparsity={target} contradicts structure={structure!r}")
            target = self.nm.sparsity
        self.settings = {
            "target_sparsity": target, "initial_sparsity": 0.0, "warmup": 0.1, "cooldown": 0.1, "prune_every": 10,
            "schedule": "cubic", "schedule_steps": None,
        }  # fmt: skip
        self.settings.update({k: v for k, v in overrides.items() if k in SCHEDULE_KEYS and v is not None})
        self.include, self.exclude = overrides.get("include"), overrides.get("exclude")
        check_schedule_values(**self.settings)
        self.schedule: PruneSchedule | None = None
        self.layers: dict[str, nn.Linear] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.last_step, self.level = 0, 0.0

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        return [cls(**overrides)]

    def setup(self, model, args, state) -> None:
        from .._dist import refuse_zero3
        from ..pruning.oneshot import target_linears

        refuse_zero3(model, "PruneCallback(method='magnitude')")  # ZeRO-3 weights are empty outside forward
        self.schedule = PruneSchedule.from_settings(self.settings, _max_steps(state, "magnitude"), "magnitude")
        self.layers = target_linears(model, include=self.include, exclude=self.exclude)
        if self.nm is not None:
            bad = [n for n, m in self.layers.items() if m.in_features % self.nm.m]
            if bad:
                raise ValueError(f"structure={self.nm} needs in_features divisible by {self.nm.m}; {bad[0]} is not")
        frozen = [n for n, m in self.layers.items() if not m.weight.requires_grad]
        if len(frozen) == len(self.layers):
            warnings.warn(
                "magnitude: every target weight is frozen; masks are applied but nothing trains", stacklevel=2
            )
        self.masks = {n: m.weight.detach() != 0 for n, m in self.layers.items()}

    @torch.no_grad()
    def accumulate(self, model, state) -> None:
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(self.masks[name].to(layer.weight.grad.dtype))

    @torch.no_grad()
    def update(self, model, state) -> None:
        step = state.global_step + 1
        if self.schedule is not None and self.schedule.is_event(step) and step > self.last_step:
            p = self.schedule.sparsity(step)
            names, new = [], []
            for name, layer in self.layers.items():
                scores, mask = layer.weight.detach().abs().float(), self.masks[name]
                if self.nm is None:
                    m = prune_lowest(scores.reshape(-1), mask.reshape(-1), n_pruned(p, mask.numel()))
                else:
                    k = n_pruned(p / self.nm.sparsity, self.nm.m - self.nm.n)
                    m = prune_lowest(scores.reshape(-1, self.nm.m), mask.reshape(-1, self.nm.m), k)
                names.append(name)
                new.append(m.reshape(mask.shape))
            for name, m in zip(names, broadcast_masks(new)):
                self.masks[name] = m
            self.last_step, self.level = step, p
        for name, layer in self.layers.items():
            layer.weight.mul_(self.masks[name].to(layer.weight.dtype))

    def metrics(self) -> dict[str, float]:
        if not self.masks:
            return {}
        kept = sum(int(m.sum()) for m in self.masks.values())
        numel = sum(m.numel() for m in self.masks.values())
        return {"prune/target_sparsity": float(self.level), "prune/sparsity": 1 - kept / max(numel, 1)}

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "level": self.level}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))
        self.level = float(state.get("level", 0.0))


register_driver(MagnitudeDriver)
