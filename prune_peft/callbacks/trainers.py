"""Ready-made trainers: the prune_peft mixins on ``transformers.Trainer`` and ``trl.SFTTrainer``.

Its own module, resolved on first use (PEP 562 ``__getattr__`` in the package ``__init__`` files), so that
``import prune_peft`` loads neither ``transformers.Trainer`` (which imports ``datasets``) nor trl.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from ._trainer import PruneTrainerMixin
from .qtuning import QTuningTrainerMixin

__all__ = ["PruneSFTTrainer", "PruneTrainer", "QTuningSFTTrainer", "QTuningTrainer"]


class PruneTrainer(PruneTrainerMixin, Trainer):
    """``transformers.Trainer`` whose reporters receive the metrics of prune_peft callbacks."""


class PruneSFTTrainer(PruneTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose reporters receive the metrics of prune_peft callbacks."""


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    """``transformers.Trainer`` with Q-Tuning: pass ``callbacks=[QTuningCallback(...)]``."""


class QTuningSFTTrainer(QTuningTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with Q-Tuning: pass ``callbacks=[QTuningCallback(...)]``."""
