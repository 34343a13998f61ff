"""Trainer callbacks: Q-Tuning data pruning (and, from the LoRAPrune work, PruneCallback)."""

from .qtuning import (
    QTuningCallback,
    QTuningConfig,
    eu_triage,
    select_samples,
    select_tokens,
    token_scores,
)

__all__ = [
    "QTuningCallback",
    "QTuningConfig",
    "eu_triage",
    "select_samples",
    "select_tokens",
    "token_scores",
]
