"""Trainer callbacks (PruneCallback, Q-Tuning, S-STE) and the Trainer mixins that apply them.

The Q-Tuning selection math is in :mod:`prune_peft.sparsity.qtuning`, the S-STE projection in
:mod:`prune_peft.sparsity.sste`.
"""

from ._trainer import MetricsCallback, PruneTrainerMixin, lazy_trainer
from .prune import PruneCallback, PruneDriver, register_driver
from .qtuning import QTuningCallback, QTuningConfig, QTuningTrainerMixin
from .sste import SSTECallback, apply_sste, finalize_sste  # registers the "s-ste" PruneCallback driver

__all__ = [
    "MetricsCallback",
    "PruneCallback",
    "PruneDriver",
    "PruneSFTTrainer",
    "PruneTrainer",
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
    return lazy_trainer(__name__, name)  # PruneTrainer, PruneSFTTrainer, QTuningTrainer, QTuningSFTTrainer
