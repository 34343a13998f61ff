"""How prune_peft callbacks reach the Trainer: only through documented extension points.

``TrainerCallback`` events receive the model, optimizer and dataloaders but not the Trainer, and the Trainer calls its
reporters (TensorBoard, W&B, MLflow) before user callbacks in ``on_log``. Rather than walking the call stack or
re-ordering the Trainer's callback list, prune_peft offers an opt-in mixin that overrides the Trainer's public,
documented methods:

    class MyTrainer(PruneTrainerMixin, Trainer): ...      # or (PruneTrainerMixin, trl.SFTTrainer)

- ``log``: before the reporters run, every callback that is a :class:`MetricsCallback` adds its ``log_metrics()``.

Methods that change the batches or the loss extend it: :class:`~prune_peft.callbacks.qtuning.QTuningTrainerMixin`
(a ``PruneTrainerMixin``) also overrides ``get_batch_samples``, ``compute_loss`` and ``train`` for Q-Tuning.

Without the mixin every metrics-only callback still works (``QTuningCallback`` raises a ValueError naming the fix);
its metrics are appended to ``state.log_history`` in ``on_log`` (after the reporters, so they are absent from
TensorBoard/W&B).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

__all__ = ["MetricsCallback", "PruneTrainerMixin"]


class MetricsCallback(TrainerCallback):
    """A callback with metrics for the Trainer's logs (``log_metrics``); see :class:`PruneTrainerMixin`."""

    def log_metrics(self) -> dict[str, float]:
        return {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Without the mixin: complete the entry Trainer.log appended just before calling on_log.
        if logs is None or not any(k in logs for k in ("loss", "train_loss")):
            return
        metrics = {k: v for k, v in self.log_metrics().items() if k not in logs}
        if not metrics:
            return
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(metrics)


class PruneTrainerMixin:
    """Mixin for ``transformers.Trainer`` (or trl's trainers) that routes prune_peft metrics to every reporter."""

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if any(k in logs for k in ("loss", "train_loss")):
            for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, MetricsCallback):
                    logs.update(cb.log_metrics())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


TRAINERS = ("PruneSFTTrainer", "PruneTrainer", "QTuningSFTTrainer", "QTuningTrainer")


def lazy_trainer(module: str, name: str):
    """PEP 562 ``__getattr__`` body: the ready-made trainers of :mod:`.trainers`, imported on first use."""
    if name in TRAINERS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")
