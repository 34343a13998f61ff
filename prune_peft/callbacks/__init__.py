"""Trainer callbacks: Q-Tuning data pruning (and, from the LoRAPrune work, PruneCallback)."""

from .prune import PruneCallback, PruneDriver, register_driver
from .qtuning import (
    QTuningCallback,
    QTuningConfig,
    eu_triage,
    select_samples,
    select_tokens,
    token_scores,
)

__all__ = [
    "PruneCallback",
    "PruneDriver",
    "QTuningCallback",
    "QTuningConfig",
    "eu_triage",
    "register_driver",
    "select_samples",
    "select_tokens",
    "token_scores",
]
