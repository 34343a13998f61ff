"""Finding the Trainer that runs a callback.

``TrainerCallback`` events receive the model, optimizer and dataloaders but not the Trainer itself, and some
callbacks must wrap one of its methods (Q-Tuning's batch sampling, S-STE's logging) before training starts. The
Trainer calls ``on_init_end`` from its own ``__init__`` and the train events from ``train()``, so it is a local
``self`` on the call stack at those points; the callback list check makes sure it is the Trainer holding *this*
callback, not an outer one.
"""

from __future__ import annotations

import inspect


def find_trainer(callback):
    """The ``transformers.Trainer`` whose callback list holds ``callback``, from the call stack; ``None`` if absent."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and any(cb is callback for cb in obj.callback_handler.callbacks):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None
