"""State shared by the demo stages: the loaded model and texts, the pruned models, and the report so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DemoContext", "log", "log_budget_cut"]


@dataclass
class DemoContext:
    out: Path
    quick: bool
    model: object = None  # dense model, kept pristine
    tokenizer: object = None
    train_texts: list = field(default_factory=list)
    heldout_texts: list = field(default_factory=list)
    pruned: dict = field(default_factory=dict)  # name -> pruned model (reused by later stages)
    report: dict = field(default_factory=dict)

    @property
    def eval_windows(self) -> int:
        return 4 if self.quick else 8

    @property
    def nsamples(self) -> int:
        return 4 if self.quick else 16

    def ppl(self, model) -> float:
        from ..evaluation import perplexity

        return perplexity(model, self.tokenizer, self.heldout_texts, seqlen=512, max_windows=self.eval_windows)


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def log_budget_cut(stage: str, steps: int, planned: int, budget_s: float) -> str:
    """Say on the console that ``stage`` stopped at its wall-clock budget, with how much of the plan it ran."""
    msg = f"{stage}: cut by its time budget ({budget_s:.0f}s) after {steps} of {planned} planned steps"
    log(msg)
    return msg
