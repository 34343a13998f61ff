"""``QTuningSFTTrainer``: the Q-Tuning mixin on ``trl.SFTTrainer``.

In its own module so that trl is imported only by code that uses it: ``prune_peft.callbacks.qtuning`` (and the
package ``__init__`` files) resolve the name on first access (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from trl import SFTTrainer

from .qtuning import QTuningTrainerMixin

__all__ = ["QTuningSFTTrainer"]


class QTuningSFTTrainer(QTuningTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with Q-Tuning: pass ``callbacks=[QTuningCallback(...)]``."""
