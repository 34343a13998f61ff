"""Trainer callbacks (PruneCallback, Q-Tuning, S-STE) and the Trainer mixins that apply them.

The Q-Tuning selection math is in :mod:`prune_peft.sparsity.qtuning`, the S-STE projection in
:mod:`prune_peft.sparsity.sste`.
"""

from ._trainer import MetricsCallback, PruneTrainerMixin
from .prune import PruneCallback, PruneDriver, register_driver
from .qtuning import QTuningCallback, QTuningConfig, QTuningTrainer, QTuningTrainerMixin
from .sste import SSTECallback, apply_sste, finalize_sste  # registers the "s-ste" PruneCallback driver

__all__ = [
    "MetricsCallback",
    "PruneCallback",
    "PruneDriver",
    "PruneTrainerMixin",
    "QTuningCallback",
    "QTuningConfig",
    "QTuningSFTTrainer",
    "QTuningTrainer",
    "QTuningTrainerMixin",
    "SSTECallback",
    "apply_sste",
    "finalize_sste",
    "register_driver",
]


def __getattr__(name: str):
    if name == "QTuningSFTTrainer":  # imports trl: loaded on first use (see ._qtuning_sft)
        from ._qtuning_sft import QTuningSFTTrainer

        return QTuningSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
