"""S-STE training of 2:4 masks on dense weights (Hu, Zhu, Chen, NeurIPS 2024, arXiv 2409.09099), Trainer glue.

``apply_sste(model)`` replaces the model's linear layers with :class:`~prune_peft.sparsity.sste.SSTELinear` (forward
``β·S(W)``, straight-through backward, β frozen at the replacement; the same Parameter objects, so an optimizer built
before and the state-dict keys stay valid); ``SSTECallback`` does that at train start, logs the
mask-flip statistics (``sste/mask_flip_fraction``: share of 2:4 positions whose kept/pruned status changed per
optimizer step, averaged over the logging interval; ``sste/mask_flips``: their count) and, with ``finalize=True``,
bakes the hard 2:4 weights ``β·S(W)`` into plain ``nn.Linear`` layers at train end.

The same is available as ``PruneCallback(method="s-ste")`` (driver :class:`SSTEDriver`, registered here). Both keep
the frozen β of every layer in the checkpoint (``trainer_state.json``, as an ``ExportableState``), so a resumed run
uses the scales computed from the weights at the original start, not from the trained weights it resumes from (the
reference computes β once, ``init_scale``). A plain loop saves and restores them with :func:`sste_betas` /
:func:`load_sste_betas`.

This is full (dense-weight) fine-tuning with a dynamic mask; to keep a fixed mask use SparseLoRA/SPP instead.

Sharded training (docs/distributed.md): with FSDP2 (``fully_shard``) call :func:`apply_sste` *before* sharding —
FSDP2 registers each parameter with the module that holds it, so a layer swapped in afterwards would never see its
unsharded weight (refused with a ValueError naming the fix). β is then computed from the whole weight, the forward
runs on FSDP2's unsharded weight, and mask-flip statistics and :func:`finalize_sste` work on each rank's local rows
(2:4 groups lie along the unsharded input dim). DeepSpeed ZeRO-3, and bitsandbytes layers in an FSDP2 model, are
refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers.trainer_callback import ExportableState

from .._dist import refuse_sharded_bnb, refuse_zero3, sharding_kind
from ..sparsity.sste import MaskFlipTracker, SSTELinear
from ._trainer import MetricsCallback
from .prune import PruneDriver, register_driver

__all__ = ["SSTECallback", "SSTEDriver", "apply_sste", "finalize_sste", "load_sste_betas", "sste_betas", "sste_layers"]

_DEFAULT_EXCLUDE = ("lm_head", "embed_out", "output_layer", "score", "classifier")


def sste_layers(model: nn.Module) -> dict[str, SSTELinear]:
    """``{name: layer}`` of every S-STE layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SSTELinear)}


def sste_betas(model: nn.Module) -> dict[str, float]:
    """``{name: β}`` of every S-STE layer: the frozen scales, JSON-able (float32 → float → float32 is exact)."""
    return {n: float(m.sste_scale) for n, m in sste_layers(model).items()}


def load_sste_betas(model: nn.Module, betas: dict[str, float]) -> None:
    """Restore frozen scales saved by :func:`sste_betas` (after :func:`apply_sste` on the resumed model, which
    recomputed β from the trained weights). ValueError naming the layers when a saved β has no S-STE layer."""
    layers = sste_layers(model)
    missing = sorted(set(betas) - set(layers))
    if missing:
        raise ValueError(
            f"S-STE: saved betas name {missing[:3]} ({len(missing)} in all), which are not S-STE layers of this "
            "model; apply_sste with the same modules before restoring"
        )
    for name, beta in betas.items():
        layer = layers[name]
        layer.sste_scale = torch.tensor(float(beta), dtype=torch.float32, device=layer.weight.device)


def _saved_attributes(callback, state) -> dict | None:
    """The ``attributes["saved"]`` this callback type stored in the checkpoint being resumed (None at a fresh start)."""
    if state is None or not getattr(state, "global_step", 0):
        return None
    data = (getattr(state, "stateful_callbacks", None) or {}).get(type(callback).__name__)
    if isinstance(data, list):
        data = data[-1] if data else None
    return (data.get("attributes") or {}).get("saved") if isinstance(data, dict) else None


def _select(modules) -> Callable[[str], bool]:
    if modules is None:
        return lambda name: name.rsplit(".", 1)[-1] not in _DEFAULT_EXCLUDE
    if callable(modules):
        return modules
    if isinstance(modules, str):
        pattern = re.compile(modules)
        return lambda name: bool(pattern.search(name))
    names = set(modules)
    return lambda name: any(name == n or name.endswith("." + n) for n in names)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Point every parent that holds ``old`` (tied modules included) at ``new`` instead."""
    names = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def apply_sste(model: nn.Module, modules: str | Iterable[str] | Callable[[str], bool] | None = None) -> list[str]:
    """Replace linear layers with S-STE layers (in place; same Parameters and state-dict keys); returns their names.

    ``modules=None``: every ``nn.Linear`` except output heads (``lm_head``, ...). Layers must have ``in_features``
    divisible by 4 (ValueError naming the layer otherwise, before anything is replaced). Hooks registered on a
    replaced ``nn.Linear`` stay on the old module. Under FSDP/FSDP2 call it before sharding (ValueError otherwise);
    DeepSpeed ZeRO-3 is refused.
    """
    refuse_zero3(model, "S-STE")
    select = _select(modules)
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not select(name):
            continue
        if not name:
            raise ValueError("S-STE: apply_sste replaces layers inside a model; wrap a bare nn.Linear first")
        if module.in_features % 4:
            raise ValueError(f"S-STE: module {name} has in_features={module.in_features}, not divisible by 4")
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"S-STE: no nn.Linear layer selected (modules={modules!r})")
    kind = sharding_kind(model)
    if kind in ("fsdp1", "fsdp2"):
        raise ValueError(
            f"S-STE: apply_sste on a model already sharded with {kind.upper()}: FSDP registers every parameter with "
            "the module holding it, so a layer swapped in now would never get its unsharded weight. Call "
            "apply_sste(model) before fully_shard (with accelerate/Trainer FSDP: before building the Trainer); "
            "SSTECallback and PruneCallback(method='s-ste') then train the layers already there"
        )
    for _, module in chosen:
        _replace_module(model, module, SSTELinear.from_linear(module))
    return [n for n, _ in chosen]


def finalize_sste(model: nn.Module) -> list[str]:
    """Bake ``W ← β·S(W)`` (exactly 2:4) into every S-STE layer and replace it with an ``nn.Linear`` (same Parameters).

    On an FSDP2-sharded model the layers stay (FSDP2 keeps each parameter registered with its module): the weight is
    baked in place on each rank's rows and β set to 1, so the forward ``1·S(W) = W`` is exactly the baked 2:4 weight
    and the state-dict keys are those of ``nn.Linear``."""
    in_place = sharding_kind(model) == "fsdp2"
    names = []
    for name, module in sste_layers(model).items():
        if in_place:
            with torch.no_grad():
                module.weight.copy_(module.sparse_weight())
            module.sste_scale = torch.ones_like(module.sste_scale)
        else:
            _replace_module(model, module, module.to_linear())
        names.append(name)
    return names


class SSTECallback(MetricsCallback, ExportableState):
    """Trainer callback for S-STE 2:4 training of a (dense) model, with mask-flip statistics in the logs.

    The metrics reach ``log_history`` with any Trainer, and the reporters (TensorBoard, W&B) with a Trainer that has
    :class:`~prune_peft.callbacks._trainer.PruneTrainerMixin`. The frozen β travel in the checkpoint and are restored
    on ``trainer.train(resume_from_checkpoint=...)``.

    Example:

        ```py
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SSTECallback(finalize=True)])
        >>> trainer.train()  # logs sste/mask_flip_fraction; model ends exactly 2:4
        ```
    """

    def __init__(
        self,
        modules: str | Iterable[str] | Callable[[str], bool] | None = None,
        *,
        finalize: bool = False,
        track_flips: bool = True,
    ) -> None:
        self.modules = modules
        self.finalize = finalize
        self.track_flips = track_flips
        self.tracker = MaskFlipTracker()
        self.history: list[dict[str, float]] = []  # per optimizer step: flips, flip_fraction
        self._acc: dict[str, float] = {}
        self._model: nn.Module | None = None
        self.saved: dict | None = None  # set by transformers when restore_callback_states_from_checkpoint=True

    # --------------------------------------------------------------------------------------------------- setup

    def prepare(self, model: nn.Module) -> list[str]:
        """Replace the layers (if not done yet) and record the initial masks."""
        refuse_zero3(model, "SSTECallback")
        refuse_sharded_bnb(model, "SSTECallback")
        self._model = model
        names = list(sste_layers(model)) or apply_sste(model, self.modules)
        if self.track_flips:
            self.tracker.update(self._weights())
        return names

    def _weights(self) -> dict[str, torch.Tensor]:
        assert self._model is not None
        return {n: m.weight for n, m in sste_layers(self._model).items()}

    # -------------------------------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SSTECallback needs the model (the Trainer passes it to callbacks as model=...)")
        self.prepare(model)
        saved = _saved_attributes(self, state) or (self.saved if getattr(state, "global_step", 0) else None)
        if saved and saved.get("betas"):
            load_sste_betas(model, saved["betas"])  # β of the original start, not of the resumed weights
        self._acc = {}

    def state(self) -> dict:
        """Resume state for the Trainer's checkpoint: the frozen β of every S-STE layer."""
        args: dict[str, Any] = {"finalize": self.finalize, "track_flips": self.track_flips}
        if self.modules is None or isinstance(self.modules, str):
            args["modules"] = self.modules
        elif not callable(self.modules):
            args["modules"] = list(self.modules)
        betas = sste_betas(self._model) if self._model is not None else {}
        return {"args": args, "attributes": {"saved": {"betas": betas}}}

    def on_step_end(self, args, state, control, **kwargs):
        if not self.track_flips or self._model is None:
            return
        stats = self.step_stats()
        self._acc["steps"] = self._acc.get("steps", 0.0) + 1
        self._acc["flips"] = self._acc.get("flips", 0.0) + stats["flips"]
        self._acc["fraction"] = self._acc.get("fraction", 0.0) + stats["flip_fraction"]

    def step_stats(self) -> dict[str, float]:
        """Compare the current masks with the previous call's; appends to :attr:`history`."""
        stats = self.tracker.update(self._weights())
        record = {"flips": stats["flips"], "flip_fraction": stats["flip_fraction"]}
        self.history.append(record)
        return record

    def log_metrics(self) -> dict[str, float]:
        """Metrics accumulated since the last log (empty when no step ran); resets the accumulators."""
        steps = self._acc.get("steps", 0.0)
        if not steps:
            return {}
        out = {"sste/mask_flip_fraction": self._acc["fraction"] / steps, "sste/mask_flips": self._acc["flips"]}
        self._acc = {}
        return out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.finalize and self._model is not None:
            finalize_sste(self._model)


class SSTEDriver(PruneDriver):
    """``PruneCallback(method="s-ste")``: S-STE on the decoder-block linears (``include``/``exclude`` globs).

    Setup replaces the layers (β frozen now, or restored from the checkpoint on resume); after every optimizer step the
    masks are compared with the previous step's. Metrics at each logging step: ``sste/mask_flip_fraction`` (mean
    per-step share of 2:4 positions that flipped since the last log), ``sste/mask_flips`` (their count) and
    ``sste/last_flip_fraction``. Call :func:`finalize_sste` after training for hard 2:4 weights.
    """

    name = "s-ste"
    auto = False
    overrides = ("include", "exclude")

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        self.include, self.exclude = include, exclude
        self.layers: dict[str, SSTELinear] = {}
        self.tracker = MaskFlipTracker()
        self._acc: dict[str, float] = {}
        self._last = 0.0

    @classmethod
    def discover(cls, model: nn.Module, **overrides: Any) -> list[PruneDriver]:
        return [cls(**overrides)]

    def setup(self, model: nn.Module, args, state) -> None:
        from ..pruning.oneshot import target_linears

        refuse_zero3(model, "PruneCallback(method='s-ste')")
        refuse_sharded_bnb(model, "PruneCallback(method='s-ste')")
        names = set(target_linears(model, include=self.include, exclude=self.exclude))
        if any(type(m) is nn.Linear for n, m in model.named_modules() if n in names):
            apply_sste(model, lambda n: n in names)
        self.layers = {n: m for n, m in sste_layers(model).items() if n in names}
        self.tracker = MaskFlipTracker()
        self.tracker.update({n: m.weight for n, m in self.layers.items()})

    @torch.no_grad()
    def update(self, model: nn.Module, state) -> None:
        stats = self.tracker.update({n: m.weight for n, m in self.layers.items()})
        self._last = float(stats["flip_fraction"])
        self._acc["steps"] = self._acc.get("steps", 0.0) + 1
        self._acc["flips"] = self._acc.get("flips", 0.0) + float(stats["flips"])
        self._acc["fraction"] = self._acc.get("fraction", 0.0) + self._last

    def metrics(self) -> dict[str, float]:
        steps = self._acc.get("steps", 0.0)
        if not steps:
            return {}
        out = {
            "sste/mask_flip_fraction": self._acc["fraction"] / steps,
            "sste/mask_flips": self._acc["flips"],
            "sste/last_flip_fraction": self._last,
        }
        self._acc = {}
        return out

    def state_dict(self) -> dict:
        return {"betas": {n: float(m.sste_scale) for n, m in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        betas = state.get("betas") or {}
        missing = sorted(set(betas) - set(self.layers))
        if missing:
            raise ValueError(
                f"S-STE: the checkpoint has frozen betas for {missing[:3]} ({len(missing)} in all), which this run "
                "does not train with S-STE; resume with the same include/exclude"
            )
        for name, beta in betas.items():
            layer = self.layers[name]
            layer.sste_scale = torch.tensor(float(beta), dtype=torch.float32, device=layer.weight.device)


register_driver(SSTEDriver)
