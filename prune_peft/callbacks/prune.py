"""PruneCallback: drives prune_peft's pruning methods from the Hugging Face Trainer.

``PruneCallback()`` with no arguments finds every prune_peft adapter on the model and drives it from its config;
keyword arguments override the config (``PruneCallback(target_sparsity=0.3, prune_every=5)``). For a model without
adapters, ``PruneCallback(method="magnitude", target_sparsity=0.5)`` runs gradual magnitude pruning of the
decoder-block linears on the same schedule.

Events (transformers ≥ 4.42):

- ``on_train_begin``: every driver validates its settings against the run (schedule vs ``max_steps``, structure vs
  model) and raises ``ValueError`` before the first step; resume state is restored here.
- ``on_pre_optimizer_step``: gradients of the whole (accumulated, all-reduced, clipped) step are present →
  ``accumulate`` (LoRAPrune's moving-average importance).
- ``on_optimizer_step``: after ``optimizer.step()`` → ``update`` (masks grow on the schedule; re-application).
- ``on_log``: driver metrics are added to the logs and to ``state.log_history``; the callback moves itself to the
  front of the Trainer's callback list so reporters (TensorBoard, W&B, MLflow) receive them too.
- ``on_save`` / ``state()``: resume state (schedule position, moving-average importance) travels in the checkpoint
  (``ExportableState`` in ``trainer_state.json``; large element-wise importance in ``prune_peft_state.safetensors``
  next to it). Masks are adapter buffers and come back with the adapter weights.

Driver interface — one object per thing being pruned, chosen through a small registry::

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

Built-in drivers: ``"loraprune"`` (LoRAPrune adapters), ``"sparse-adapter"`` (SparseLoRA / SPP: logs their sparsity,
checks at every save that the base still has the zeros the adapter was made for), ``"magnitude"`` (plain models).

Distributed: under DDP gradients are all-reduced before ``on_pre_optimizer_step``, so every rank computes the same
importance; mask decisions use stable ordering and are additionally broadcast from rank 0 at every pruning event, so
ranks hold identical masks at every step. FSDP / DeepSpeed ZeRO-3 shard the LoRA factors and the base weights, which
the importance needs whole: the LoRAPrune driver refuses them (see docs/loraprune.md).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..sparsity.loraprune import (
    channel_scores,
    gqa_group_scores,
    grad_importance,
    lora_importance,
    moving_average,
    n_pruned,
    normalize_scores,
    prune_lowest,
)
from ..sparsity.masks import parse_pattern
from ..sparsity.schedules import cubic_schedule, linear_schedule
from ._trainer import find_trainer

__all__ = [
    "DRIVERS",
    "LoRAPruneDriver",
    "MagnitudeDriver",
    "PruneCallback",
    "PruneDriver",
    "PruneSchedule",
    "SparseAdapterDriver",
    "register_driver",
]

SIDE_FILE = "prune_peft_state.safetensors"
SCHEDULE_KEYS = (
    "target_sparsity",
    "initial_sparsity",
    "warmup",
    "cooldown",
    "prune_every",
    "schedule",
    "schedule_steps",
)

# ------------------------------------------------------------------------------------------------------ registry

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


# ------------------------------------------------------------------------------------------------------ schedule


class PruneSchedule:
    """Sparsity over optimizer steps t = 1..T with LoRAPrune's warmup/cooldown and pruning events.

    Events fire at steps ``t`` with ``warmup·T < t ≤ t_final`` and ``t % prune_every == 0``, and always at
    ``t_final = ⌈T − cooldown·T⌉`` — the first step where the schedule equals the target, so the final event
    lands exactly on it (the reference requires p(t) < p_final and can stop one group short).
    """

    def __init__(self, target: float, total: int, *, initial: float = 0.0, warmup: float = 0.1,
                 cooldown: float = 0.1, prune_every: int = 10, kind: str = "cubic") -> None:  # fmt: skip
        check_schedule_values(target=target, initial=initial, warmup=warmup, cooldown=cooldown,
                              prune_every=prune_every, schedule=kind)  # fmt: skip
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"the schedule needs a positive number of optimizer steps, got {total!r}")
        self.target, self.total, self.initial = float(target), total, float(initial)
        self.warmup, self.cooldown, self.every, self.kind = warmup, cooldown, prune_every, kind
        self.start = warmup * total
        self.final_step = max(1, math.ceil(total - cooldown * total - 1e-9))

    def sparsity(self, step: int) -> float:
        if step >= self.final_step:
            return self.target
        fn = cubic_schedule if self.kind == "cubic" else linear_schedule
        return fn(step, self.total, self.target, self.initial, self.warmup, self.cooldown)

    def is_event(self, step: int) -> bool:
        if step == self.final_step:
            return True
        return self.start < step < self.final_step and step % self.every == 0

    def events(self) -> list[int]:
        return [t for t in range(1, self.final_step + 1) if self.is_event(t)]


def check_schedule_values(**values: Any) -> None:
    """ValueError naming the field for bad schedule settings (None = not given)."""
    p = values.get("target")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
        raise ValueError(f"target_sparsity must be in [0, 1), got {p!r}")
    p0 = values.get("initial")
    if p0 is not None and (not isinstance(p0, (int, float)) or not 0 <= p0 <= (p if p is not None else 1)):
        raise ValueError(f"initial_sparsity must be in [0, target_sparsity], got {p0!r}")
    w, c = values.get("warmup"), values.get("cooldown")
    for name, v in (("warmup", w), ("cooldown", c)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
            raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}")
    if w is not None and c is not None and w + c >= 1:
        raise ValueError(f"warmup + cooldown must be < 1, got {w} + {c}")
    every = values.get("prune_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
        raise ValueError(f"prune_every must be a positive integer, got {every!r}")
    kind = values.get("schedule")
    if kind is not None and kind not in ("cubic", "linear"):
        raise ValueError(f"schedule must be 'cubic' or 'linear', got {kind!r}")
    steps = values.get("schedule_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"schedule_steps must be a positive integer or None, got {steps!r}")


def _make_schedule(settings: dict, state, owner: str) -> PruneSchedule:
    max_steps = int(getattr(state, "max_steps", 0) or 0)
    steps = settings.get("schedule_steps")
    if max_steps <= 0:
        raise ValueError(f"{owner}: the Trainer reports max_steps={max_steps}; the pruning schedule needs it")
    if steps is not None and steps > max_steps:
        raise ValueError(
            f"{owner}: schedule_steps={steps} is longer than training (max_steps={max_steps}); the target sparsity "
            "would never be reached. Lower schedule_steps (or leave it unset to use max_steps)."
        )
    return PruneSchedule(
        settings["target_sparsity"], steps or max_steps, initial=settings["initial_sparsity"],
        warmup=settings["warmup"], cooldown=settings["cooldown"], prune_every=settings["prune_every"],
        kind=settings["schedule"],
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------- distributed


def _dist_world() -> int:
    return (
        torch.distributed.get_world_size()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 1
    )


def broadcast_masks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's boolean masks on every rank (identity in a single process)."""
    if _dist_world() <= 1 or not masks:
        return masks
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks])
    torch.distributed.broadcast(flat, src=0)
    out, offset = [], 0
    for m in masks:
        out.append(flat[offset : offset + m.numel()].reshape(m.shape).bool().to(m.device))
        offset += m.numel()
    return out


def _refuse_sharded(model: nn.Module, owner: str) -> None:
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (torch ≥ 2.6)

        kinds.append(FSDPModule)
    except ImportError:
        pass
    fsdp = any(isinstance(m, tuple(kinds)) for m in model.modules()) if kinds else False
    for p in [] if fsdp else model.parameters():
        if (
            hasattr(p, "ds_numel")
            or type(p).__name__ in ("DTensor", "FlatParameter")
            or getattr(p, "_is_sharded", False)
        ):
            fsdp = True
            break
    if fsdp:
        raise ValueError(
            f"{owner}: parameters are sharded (FSDP or DeepSpeed ZeRO-3). LoRA-guided importance needs whole "
            "LoRA factors, gradients and base weights on every rank; train with DDP (or ZeRO ≤ 2 / single GPU). "
            "See docs/loraprune.md, 'Distributed training'."
        )


# ------------------------------------------------------------------------------------------------ LoRAPrune driver


def _find_tuners(model: nn.Module, cls: type) -> list:
    return [m for m in model.modules() if isinstance(m, cls)]


class LoRAPruneDriver(PruneDriver):
    """Drives one LoRAPrune adapter: moving-average LoRA-guided importance, cubic schedule, masks (see the config)."""

    name = "loraprune"
    overrides = (*SCHEDULE_KEYS, "importance_beta", "importance")

    def __init__(self, tuner, adapter: str, **overrides: Any) -> None:
        self.tuner, self.adapter = tuner, adapter
        config = tuner.peft_config[adapter]
        self.config = config
        self.settings = {
            "target_sparsity": config.target_sparsity,
            "initial_sparsity": config.initial_sparsity,
            "warmup": config.warmup,
            "cooldown": config.cooldown,
            "prune_every": config.prune_every,
            "schedule": config.schedule,
            "schedule_steps": config.schedule_steps,
            "importance_beta": config.importance_beta,
            "importance": config.importance,
        }
        if "structure" in overrides:
            raise ValueError("loraprune: structure is fixed when the adapter is created (LoRAPruneConfig.structure)")
        self.settings.update({k: v for k, v in overrides.items() if v is not None})
        if config.nm is not None and abs(self.settings["target_sparsity"] - config.nm.sparsity) > 1e-9:
            raise ValueError(
                f"loraprune: target_sparsity={self.settings['target_sparsity']} contradicts structure="
                f"{config.structure!r}"
            )
        self.schedule: PruneSchedule | None = None
        self.importance: dict[str, torch.Tensor] = {}  # moving averages: "u<i>"/"c<i>" (blocks) or module names
        self.last_step = 0
        self.level = 0.0

    @property
    def key(self) -> str:
        return f"loraprune:{self.adapter}"

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        from ..tuners.loraprune import LoRAPruneModel

        out = []
        for tuner in _find_tuners(model, LoRAPruneModel):
            for adapter, cfg in tuner.peft_config.items():
                if cfg.peft_type.value == "LORAPRUNE":
                    out.append(cls(tuner, adapter, **overrides))
        return out

    # ---------------------------------------------------------------------------------------------- validation

    def setup(self, model: nn.Module, args, state) -> None:
        s = self.settings
        check_schedule_values(target=s["target_sparsity"], initial=s["initial_sparsity"], warmup=s["warmup"],
                              cooldown=s["cooldown"], prune_every=s["prune_every"], schedule=s["schedule"],
                              schedule_steps=s["schedule_steps"])  # fmt: skip
        if s["importance"] not in ("lora", "magnitude", "grad"):
            raise ValueError(f"importance must be 'lora', 'magnitude' or 'grad', got {s['importance']!r}")
        if not 0 <= s["importance_beta"] < 1:
            raise ValueError(f"importance_beta must be in [0, 1), got {s['importance_beta']!r}")
        self.schedule = _make_schedule(s, state, "loraprune")
        _refuse_sharded(model, "loraprune")
        self.blocks = [b for b in self.tuner.prune_blocks(self.adapter) if b.prunable]
        if self.config.structured:
            for b in self.blocks:
                if b.prunes_heads and n_pruned(s["target_sparsity"], b.num_kv_heads) >= b.num_kv_heads:
                    raise ValueError(
                        f"loraprune: target_sparsity={s['target_sparsity']} would remove every head of {b.name}"
                    )
                if b.prunes_channels and n_pruned(s["target_sparsity"], b.intermediate) >= b.intermediate:
                    raise ValueError(f"loraprune: target_sparsity={s['target_sparsity']} would remove every channel")
        else:
            self.elements = self.tuner.element_layers(self.adapter)
        if s["importance"] == "grad":
            frozen = [n for n, m in self._layers() if not m.get_base_layer().weight.requires_grad]
            if frozen:
                raise ValueError(
                    f"loraprune: importance='grad' needs gradients of the base weights, but {frozen[0]} (and "
                    f"{len(frozen) - 1} more) is frozen; set requires_grad=True on them or use importance='lora'"
                )

    def _layers(self):
        if self.config.structured:
            for b in self.blocks:
                for role, layer in b.layers.items():
                    yield f"{b.name}.{role}", layer
        else:
            yield from self.elements.items()

    # ---------------------------------------------------------------------------------------------- importance

    def _importance(self, layer) -> torch.Tensor | None:
        """Element importance of one layer under the configured metric (None when its gradients are missing)."""
        a = self.adapter
        base = layer.get_base_layer()
        A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
        mode = self.settings["importance"]
        if mode == "lora":
            if A.grad is None or B.grad is None:
                return None
            return lora_importance(base.weight, A, B, A.grad, B.grad, s)
        if mode == "grad":
            if base.weight.grad is None:
                return None
            return grad_importance(base.weight, base.weight.grad, A, B, s)
        return torch.addmm(base.weight.detach().float(), B.detach().float(), A.detach().float(), alpha=s).abs_()

    def _channel_scores(self, layer, axis: str) -> torch.Tensor | None:
        """Row (``"out"``) or column (``"in"``) sums of one layer's importance; None when its gradients are missing."""
        a = self.adapter
        base = layer.get_base_layer()
        A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
        mode = self.settings["importance"]
        if mode == "lora":
            if A.grad is None or B.grad is None:
                return None
            return channel_scores(base.weight, A, B, s, grad_A=A.grad, grad_B=B.grad, axis=axis)
        if mode == "grad":
            if base.weight.grad is None:
                return None
            return channel_scores(base.weight, A, B, s, grad_W=base.weight.grad, axis=axis)
        return channel_scores(base.weight, A, B, s, axis=axis)

    def _block_scores(self, b) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        units = channels = None
        if b.prunes_heads:
            parts = []
            for role, axis in (("q_proj", "out"), ("k_proj", "out"), ("v_proj", "out"), ("o_proj", "in")):
                layer = b.layers.get(role)
                score = self._channel_scores(layer, axis) if layer is not None else None
                if score is not None:
                    parts.append(normalize_scores(gqa_group_scores(score, b.head_dim, b.num_kv_heads)))
            units = torch.stack(parts).sum(0) if parts else None
        if b.prunes_channels:
            parts = []
            for role, axis in (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in")):
                layer = b.layers.get(role)
                score = self._channel_scores(layer, axis) if layer is not None else None
                if score is not None:
                    parts.append(normalize_scores(score))
            channels = torch.stack(parts).sum(0) if parts else None
        return units, channels

    @torch.no_grad()
    def accumulate(self, model: nn.Module, state) -> None:
        step = state.global_step + 1
        if self.schedule is None or step > self.schedule.final_step:
            return  # no event left: the importance would never be used
        beta, seen = self.settings["importance_beta"], 0
        if self.config.structured:
            for b in self.blocks:
                units, channels = self._block_scores(b)
                for key, new in ((f"u{b.index}", units), (f"c{b.index}", channels)):
                    if new is not None:
                        self.importance[key] = moving_average(self.importance.get(key), new.cpu(), beta)
                        seen += 1
        else:
            for name, layer in self.elements.items():
                imp = self._importance(layer)
                if imp is not None:
                    self.importance[name] = moving_average(self.importance.get(name), imp, beta)
                    seen += 1
        if not seen and self.settings["importance"] != "magnitude":
            raise RuntimeError(
                "loraprune: no LoRA gradients were present at on_pre_optimizer_step; the importance cannot be "
                "estimated. (DeepSpeed ZeRO ≥ 2 keeps gradients out of .grad; see docs/loraprune.md.)"
            )

    # ---------------------------------------------------------------------------------------------------- masks

    @torch.no_grad()
    def update(self, model: nn.Module, state) -> None:
        step = state.global_step + 1
        if self.schedule is None or not self.schedule.is_event(step) or step <= self.last_step:
            return
        p = self.schedule.sparsity(step)
        if self.config.structured:
            self._update_structured(p)
        else:
            self._update_elements(p)
        self.last_step, self.level = step, p

    def _update_structured(self, p: float) -> None:
        current = self.tuner.get_masks(self.adapter)
        new: list[tuple[int, str, torch.Tensor]] = []
        for b in self.blocks:
            for kind, key, n_groups in (
                ("units", f"u{b.index}", b.num_kv_heads),
                ("channels", f"c{b.index}", b.intermediate),
            ):
                if kind not in current.get(b.index, {}):
                    continue
                mask = current[b.index][kind]
                scores = self.importance.get(key)
                if scores is None:
                    scores = torch.zeros(n_groups)
                new.append((b.index, kind, prune_lowest(scores, mask, n_pruned(p, n_groups))))
        masks = broadcast_masks([m for _, _, m in new])
        for (index, kind, _), mask in zip(new, masks):
            self.tuner.set_block_masks(index, adapter=self.adapter, **{kind: mask})

    def _update_elements(self, p: float) -> None:
        nm = self.config.nm
        names, masks = [], []
        for name, layer in self.elements.items():
            mask = layer.element_mask(self.adapter)
            scores = self.importance.get(name)
            if scores is None:
                scores = torch.zeros(mask.shape)
            scores = scores.to(mask.device)
            if nm is None:
                new = prune_lowest(scores.reshape(-1), mask.reshape(-1), n_pruned(p, mask.numel())).reshape(mask.shape)
            else:  # progressive N:M: k of every M removed, k → M − N at the target
                k = n_pruned(p / nm.sparsity if nm.sparsity else 0.0, nm.m - nm.n)
                new = prune_lowest(scores.reshape(-1, nm.m), mask.reshape(-1, nm.m), k).reshape(mask.shape)
            names.append(name)
            masks.append(new)
        for name, mask in zip(names, broadcast_masks(masks)):
            self.elements[name].set_element_mask(self.adapter, mask)

    # -------------------------------------------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.schedule is None:
            return out
        pre = "prune/"
        out[pre + "target_sparsity"] = float(self.level)
        if self.config.structured:
            self._structured_metrics(out)
        else:
            kept: dict[str, list[int]] = {}
            for name, layer in self.elements.items():
                mask = layer.element_mask(self.adapter)
                role = name.rpartition(".")[2]
                k = kept.setdefault(role, [0, 0])
                k[0] += int(mask.sum())
                k[1] += mask.numel()
            for role, (k, n) in sorted(kept.items()):
                out[f"{pre}sparsity/{role}"] = 1 - k / n
            total_k = sum(v[0] for v in kept.values())
            total_n = sum(v[1] for v in kept.values())
            out[pre + "sparsity"] = 1 - total_k / max(total_n, 1)
        values = [v for v in self.importance.values()]
        if values:
            means = torch.stack([v.float().mean() for v in values])
            out[pre + "importance_mean"] = float(means.mean())
            out[pre + "importance_max"] = float(max(float(v.max()) for v in values))
            out[pre + "importance_min"] = float(min(float(v.min()) for v in values))
        return out

    def _structured_metrics(self, out: dict[str, float]) -> None:
        masks = self.tuner.get_masks(self.adapter)
        heads = heads_total = kv = kv_total = ch = ch_total = 0
        removed = total = 0
        for b in self.tuner.prune_blocks(self.adapter):
            sizes = {role: layer.get_base_layer().weight.numel() for role, layer in b.layers.items()}
            total += sum(sizes.values())
            m = masks.get(b.index, {}) if b.prunable else {}
            if "units" in m:
                n_cut = int((~m["units"]).sum())
                group = b.num_heads // b.num_kv_heads
                kv += n_cut
                kv_total += b.num_kv_heads
                heads += n_cut * group
                heads_total += b.num_heads
                frac = n_cut / b.num_kv_heads
                removed += frac * sum(sizes.get(r, 0) for r in ("q_proj", "k_proj", "v_proj", "o_proj"))
            if "channels" in m:
                n_cut = int((~m["channels"]).sum())
                ch += n_cut
                ch_total += b.intermediate
                removed += n_cut / b.intermediate * sum(sizes.get(r, 0) for r in ("gate_proj", "up_proj", "down_proj"))
        pre = "prune/"
        if kv_total:
            out[pre + "pruned_heads"] = float(heads)
            out[pre + "pruned_kv_heads"] = float(kv)
            out[pre + "attention_sparsity"] = heads / heads_total
        if ch_total:
            out[pre + "pruned_channels"] = float(ch)
            out[pre + "mlp_sparsity"] = ch / ch_total
        out[pre + "param_sparsity"] = removed / max(total, 1)

    # --------------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        out = {"last_step": self.last_step, "level": self.level}
        if self.config.structured:  # small: per-block vectors, exact through JSON (float32 → double → float32)
            out["importance"] = {k: v.tolist() for k, v in self.importance.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))
        self.level = float(state.get("level", 0.0))
        if "importance" in state:
            self.importance = {k: torch.tensor(v, dtype=torch.float32) for k, v in state["importance"].items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.config.structured else dict(self.importance)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.config.structured:
            self.importance = dict(tensors)


register_driver(LoRAPruneDriver)


# ----------------------------------------------------------------------------------------- sparse adapter monitor


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

        return [cls(t, a) for t in _find_tuners(model, SparseTunerMixin) for a in t.peft_config]

    def setup(self, model, args, state) -> None:
        self._summary = self._measure()

    def _measure(self) -> dict[str, float]:
        from ..tuners._base import sparse_layers
        from ..tuners._masks import describe_pattern

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
                problem = layer._pp_problem(self.adapter)
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
        check_schedule_values(target=self.settings["target_sparsity"], initial=self.settings["initial_sparsity"],
                              warmup=self.settings["warmup"], cooldown=self.settings["cooldown"],
                              prune_every=self.settings["prune_every"], schedule=self.settings["schedule"],
                              schedule_steps=self.settings["schedule_steps"])  # fmt: skip
        self.schedule: PruneSchedule | None = None
        self.layers: dict[str, nn.Linear] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.last_step, self.level = 0, 0.0

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        return [cls(**overrides)]

    def setup(self, model, args, state) -> None:
        from ..pruning.oneshot import target_linears

        self.schedule = _make_schedule(self.settings, state, "magnitude")
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


# ---------------------------------------------------------------------------------------------------- callback


class PruneCallback(TrainerCallback, ExportableState):
    """Runs every prune_peft pruning method found on the model from the Trainer's optimizer-step events.

    Args:
        method: a registered driver name (``"loraprune"``, ``"sparse-adapter"``, ``"magnitude"``, …) to use only
            that driver; default: every auto-discovered driver (all prune_peft adapters on the model).
        **overrides: settings that override the adapter configs, e.g. ``target_sparsity``, ``warmup``,
            ``cooldown``, ``prune_every``, ``schedule``, ``schedule_steps``, ``initial_sparsity``,
            ``importance_beta``; for ``method="magnitude"`` also ``structure`` ("unstructured" / "N:M"),
            ``include``/``exclude`` (globs on module names).

    Example:

        ```py
        >>> model = get_peft_model(dense, LoRAPruneConfig(r=8, target_sparsity=0.5, structure="head+channel"))
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PruneCallback()])
        >>> trainer.train()
        ```
    """

    def __init__(self, method: str | None = None, **overrides: Any) -> None:
        if method is not None and method not in DRIVERS:
            raise ValueError(f"method must be one of {sorted(DRIVERS)} (or None to discover), got {method!r}")
        known = set().union(*(DRIVERS[m].overrides for m in ([method] if method else DRIVERS)))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"PruneCallback: unknown setting(s) {unknown}; known: {sorted(known)}")
        check_schedule_values(target=overrides.get("target_sparsity"), initial=overrides.get("initial_sparsity"),
                              warmup=overrides.get("warmup"), cooldown=overrides.get("cooldown"),
                              prune_every=overrides.get("prune_every"), schedule=overrides.get("schedule"),
                              schedule_steps=overrides.get("schedule_steps"))  # fmt: skip
        self.method = method
        self.overrides = dict(overrides)
        if method == "magnitude":
            MagnitudeDriver(**overrides)  # validates the arguments now, before any Trainer exists
        self.drivers: list[PruneDriver] = []
        self.saved: dict | None = None  # set by transformers when restore_callback_states_from_checkpoint=True
        self._trainer = None

    # --------------------------------------------------------------------------------------------- discovery

    def _discover(self, model: nn.Module) -> list[PruneDriver]:
        names = [self.method] if self.method else [n for n, c in DRIVERS.items() if c.auto]
        drivers: list[PruneDriver] = []
        for name in names:
            cls = DRIVERS[name]
            kwargs = {k: v for k, v in self.overrides.items() if k in cls.overrides}
            drivers.extend(cls.discover(model, **kwargs))
        if not drivers:
            raise ValueError(
                "PruneCallback found nothing to prune: the model has no prune_peft adapter (LoRAPruneConfig, "
                "SparseLoraConfig, SPPConfig). For a plain model use PruneCallback(method='magnitude', "
                "target_sparsity=...)."
            )
        return drivers

    def _resume_dir(self, args, state) -> str | None:
        frame = inspect.currentframe()
        try:
            while frame is not None:
                path = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(path, str) and os.path.isdir(path):
                    return path
                frame = frame.f_back
        finally:
            del frame
        guess = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return guess if os.path.isdir(guess) else None

    # ------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("PruneCallback needs the model in on_train_begin (transformers Trainer passes it)")
        trainer = find_trainer(self)
        if trainer is not None:
            self._trainer = trainer
            callbacks = trainer.callback_handler.callbacks
            if callbacks and callbacks[0] is not self:  # before the reporters, so they see our metrics
                trainer.callback_handler.callbacks = [self] + [cb for cb in callbacks if cb is not self]
        self.drivers = self._discover(model)
        for driver in self.drivers:
            driver.setup(model, args, state)
        self._restore(args, state)

    def _restore(self, args, state) -> None:
        saved = None
        if state.global_step > 0:
            data = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
            if isinstance(data, list):
                data = data[-1] if data else None
            if isinstance(data, dict):
                saved = (data.get("attributes") or {}).get("saved")
            saved = saved or self.saved
        if not saved:
            return
        for driver in self.drivers:
            entry = saved.get("drivers", {}).get(driver.key)
            if entry is not None:
                driver.load_state_dict(entry)
        if saved.get("side_file"):
            folder = self._resume_dir(args, state)
            path = os.path.join(folder, SIDE_FILE) if folder else None
            if path is None or not os.path.isfile(path):
                warnings.warn(
                    f"PruneCallback: {SIDE_FILE} not found next to the checkpoint; the element-wise importance "
                    "restarts from zero (masks are restored with the adapter)",
                    stacklevel=2,
                )
                return
            from safetensors.torch import load_file

            tensors = load_file(path)
            for driver in self.drivers:
                prefix = driver.key + "/"
                driver.load_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.accumulate(model, state)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.update(model, state)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for driver in self.drivers:
            out.update(driver.metrics())
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.drivers or not any(k in logs for k in ("loss", "train_loss")):
            return
        metrics = self.metrics()
        logs.update(metrics)  # reporters after us in the callback list see these
        last = state.log_history[-1] if state.log_history else None
        same = last is not None and last.get("step") == state.global_step
        if same and all(last.get(k) == logs[k] for k in ("loss", "train_loss") if k in logs):
            last.update(metrics)  # Trainer.log appended the entry before on_log: complete it

    def on_save(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.on_save(model, args, state)
        tensors = {f"{d.key}/{k}": v.detach().contiguous().cpu() for d in self.drivers for k, v in d.tensors().items()}
        if tensors and args.should_save:
            from safetensors.torch import save_file

            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_file(tensors, os.path.join(folder, SIDE_FILE))

    # -------------------------------------------------------------------------------------------------- state

    def state(self) -> dict:
        drivers = {d.key: d.state_dict() for d in self.drivers}
        side = any(d.tensors() for d in self.drivers)
        args = {"method": self.method, **self.overrides}
        return {"args": args, "attributes": {"saved": {"drivers": drivers, "side_file": side}}}
