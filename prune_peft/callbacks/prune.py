"""PruneCallback: drives prune_peft's pruning methods from the Hugging Face Trainer.

``PruneCallback()`` with no arguments finds every prune_peft adapter on the model and drives it from its config;
keyword arguments override the config (``PruneCallback(target_sparsity=0.3, prune_every=5)``). For a model without
adapters, ``PruneCallback(method="magnitude", target_sparsity=0.5)`` runs gradual magnitude pruning of the
decoder-block linears on the same schedule.

The callback only delegates: each method's algorithm lives with its tuner (LoRAPrune: ``update_importance`` /
``update_and_allocate`` on ``model.base_model``, as peft's AdaLoRA), wrapped by a driver from
:mod:`prune_peft.callbacks.drivers` (interface and registry there; ``register_driver`` / ``PruneDriver`` are
re-exported here).

Events (transformers ≥ 4.42):

- ``on_train_begin``: every driver validates its settings against the run (schedule vs ``max_steps``, structure vs
  model) and raises ``ValueError`` before the first step; resume state is restored here.
- ``on_pre_optimizer_step``: gradients of the whole (accumulated, all-reduced, clipped) step are present →
  ``accumulate`` (LoRAPrune: ``tuner.update_importance(global_step)``).
- ``on_optimizer_step``: after ``optimizer.step()`` → ``update`` (LoRAPrune: ``tuner.update_and_allocate``).
- Logging: a :class:`~prune_peft.callbacks._trainer.MetricsCallback`. With ``PruneTrainerMixin`` on the Trainer the
  driver metrics reach every reporter (TensorBoard, W&B, MLflow); without it they are added to
  ``state.log_history`` only.
- ``state()``: resume state (schedule position, moving-average importance) travels in the checkpoint
  (``ExportableState`` in ``trainer_state.json``; large element-wise importance in ``prune_peft_state.safetensors``
  inside the checkpoint folder, written atomically before ``trainer_state.json`` and recorded by checksum). Masks
  are adapter buffers and come back with the adapter weights.
- SparseLoRA/SPP train on FSDP2-sharded models (``fully_shard`` after ``get_peft_model``; the save-time zero check
  reads each rank's rows); FSDP1, DeepSpeed ZeRO-3 and unmanaged adapter parameters are refused in
  ``on_train_begin``.

Resume reads the side file from ``args.resume_from_checkpoint`` when that is a path, else from
``<output_dir>/checkpoint-<global_step>`` (where ``trainer.train(resume_from_checkpoint=...)`` checkpoints live);
if the saved state says a side file was written and it is not there, resuming raises instead of continuing inexactly.

Distributed: under DDP gradients are all-reduced before ``on_pre_optimizer_step``, so every rank computes the same
importance; mask decisions use stable ordering and are additionally broadcast from rank 0 at every pruning event, so
ranks hold identical masks at every step. FSDP / DeepSpeed ZeRO-3 shard the LoRA factors and the base weights, which
the importance needs whole: the LoRAPrune driver refuses them (see docs/loraprune.md).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.trainer_callback import ExportableState

from .._dist import refuse_sharded_bnb
from ..sparsity.schedules import SCHEDULE_KEYS, check_schedule_values
from ._trainer import MetricsCallback
from .drivers import DRIVERS, LoRAPruneDriver, MagnitudeDriver, PruneDriver, SparseAdapterDriver, register_driver

__all__ = [
    "DRIVERS",
    "SIDE_FILE",
    "LoRAPruneDriver",
    "MagnitudeDriver",
    "PruneCallback",
    "PruneDriver",
    "SparseAdapterDriver",
    "register_driver",
]

SIDE_FILE = "prune_peft_state.safetensors"


class PruneCallback(MetricsCallback, ExportableState):
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
        >>> class MyTrainer(PruneTrainerMixin, Trainer): ...     # optional: metrics reach TensorBoard/W&B too
        >>> model = get_peft_model(dense, LoRAPruneConfig(r=8, target_sparsity=0.5, structure="head+channel"))
        >>> trainer = MyTrainer(model=model, args=args, train_dataset=ds, callbacks=[PruneCallback()])
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
        check_schedule_values(**{k: overrides.get(k) for k in SCHEDULE_KEYS})
        self.method = method
        self.overrides = dict(overrides)
        if method == "magnitude":
            MagnitudeDriver(**overrides)  # validates the arguments now, before any Trainer exists
        self.drivers: list[PruneDriver] = []
        self.saved: dict | None = None  # set by transformers when restore_callback_states_from_checkpoint=True

    def _discover(self, model: nn.Module) -> list[PruneDriver]:
        names = [self.method] if self.method else [n for n, c in DRIVERS.items() if c.auto]
        drivers: list[PruneDriver] = []
        for name in names:
            cls = DRIVERS[name]
            drivers.extend(cls.discover(model, **{k: v for k, v in self.overrides.items() if k in cls.overrides}))
        if not drivers:
            raise ValueError(
                "PruneCallback found nothing to prune: the model has no prune_peft adapter (LoRAPruneConfig, "
                "SparseLoraConfig, SPPConfig). For a plain model use PruneCallback(method='magnitude', "
                "target_sparsity=...)."
            )
        return drivers

    # ------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("PruneCallback needs the model in on_train_begin (transformers Trainer passes it)")
        self.drivers = self._discover(model)
        self._refuse_sharded(model)
        refuse_sharded_bnb(model, "PruneCallback")  # QLoRA-FSDP: see prune_peft._dist.refuse_sharded_bnb
        self._args, self._state = args, state  # state() writes the side file into the checkpoint being saved
        for driver in self.drivers:
            driver.setup(model, args, state)
        self._restore(args, state)

    def _refuse_sharded(self, model: nn.Module) -> None:
        """SparseLoRA/SPP run on FSDP2 (``fully_shard``); FSDP1, ZeRO-3 and layouts FSDP2 cannot serve are refused
        here, before the first step (:func:`prune_peft.tuners._fsdp.check_sharded_layout`)."""
        if not any(isinstance(d, SparseAdapterDriver) for d in self.drivers):
            return
        from ..tuners._fsdp import check_sharded_layout

        check_sharded_layout(model, owner="PruneCallback")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.accumulate(model, state)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.update(model, state)

    def log_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for driver in self.drivers:
            out.update(driver.metrics())
        return out

    def on_save(self, args, state, control, model=None, **kwargs):
        for driver in self.drivers:
            driver.on_save(model, args, state)

    # -------------------------------------------------------------------------------------------------- state

    def state(self) -> dict:
        """Resume state for ``trainer_state.json``; the element-wise tensors go to the side file, written here.

        The Trainer calls ``state()`` while saving a checkpoint, after the model and optimizer files and *before*
        ``trainer_state.json`` (which makes the folder a resumable checkpoint): a run killed in between leaves a
        checkpoint without ``trainer_state.json`` that nothing resumes from, never one without the side file. The
        side file's SHA-256 is recorded so a tampered or foreign file is refused on resume.
        """
        drivers = {d.key: d.state_dict() for d in self.drivers}
        tensors = {f"{d.key}/{k}": v.detach().contiguous().cpu() for d in self.drivers for k, v in d.tensors().items()}
        saved: dict[str, Any] = {"drivers": drivers, "side_file": bool(tensors)}
        if tensors:
            saved["side_sha256"] = self._write_side_file(tensors)
        args = {"method": self.method, **self.overrides}
        return {"args": args, "attributes": {"saved": saved}}

    def _write_side_file(self, tensors: dict) -> str | None:
        import hashlib

        from safetensors.torch import save

        from .._io import atomic_write_bytes

        data = save(tensors)
        targs, tstate = getattr(self, "_args", None), getattr(self, "_state", None)
        if targs is not None and tstate is not None and targs.should_save:
            folder = os.path.join(targs.output_dir, f"checkpoint-{tstate.global_step}")
            if os.path.isdir(folder):
                atomic_write_bytes(os.path.join(folder, SIDE_FILE), data)
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def checkpoint_dir(args, state) -> str:
        """The checkpoint being resumed: ``args.resume_from_checkpoint`` when it is a path, else the Trainer's
        ``<output_dir>/checkpoint-<global_step>``."""
        if isinstance(args.resume_from_checkpoint, str):
            return args.resume_from_checkpoint
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

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
        if not saved.get("side_file"):
            return
        path = os.path.join(self.checkpoint_dir(args, state), SIDE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"PruneCallback: resuming at step {state.global_step} needs {path} (the element-wise importance "
                "saved with the checkpoint), which is missing; resuming without it would not continue the run "
                "exactly. Copy the checkpoint folder whole, or set TrainingArguments(resume_from_checkpoint=<path>) "
                "when it lives outside output_dir."
            )
        import hashlib

        from safetensors.torch import load

        data = open(path, "rb").read()
        want = saved.get("side_sha256")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(
                f"PruneCallback: {path} does not match the checksum recorded in the checkpoint's trainer_state.json "
                "(truncated, tampered or from another checkpoint); resuming from it would not continue the run "
                "exactly. Resume from an intact checkpoint."
            )
        try:
            tensors = load(data)
        except Exception as exc:
            raise ValueError(
                f"PruneCallback: {path} cannot be read ({exc}); resume from an intact checkpoint"
            ) from exc
        for driver in self.drivers:
            prefix = driver.key + "/"
            driver.load_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
