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
from .sste import SSTECallback, apply_sste, finalize_sste  # registers the "s-ste" PruneCallback driver

__all__ = [
    "PruneCallback",
    "PruneDriver",
    "QTuningCallback",
    "QTuningConfig",
    "SSTECallback",
    "apply_sste",
    "eu_triage",
    "finalize_sste",
    "register_driver",
    "select_samples",
    "select_tokens",
    "token_scores",
]
