"""State shared by the demo stages: the loaded model and texts, the pruned models, and the report so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EVAL_SEQLEN", "DemoContext", "log", "log_budget_cut"]

EVAL_SEQLEN = 512


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

        return perplexity(model, self.tokenizer, self.heldout_texts, seqlen=EVAL_SEQLEN, max_windows=self.eval_windows)

    def eval_token_windows(self) -> list:
        """The token windows :meth:`ppl` scores (disjoint, ``EVAL_SEQLEN`` long; the last may be shorter), for
        scoring in a process that cannot import prune_peft."""
        from ..evaluation import tokenize_stream

        tokens = tokenize_stream(self.heldout_texts, self.tokenizer, self.eval_windows * EVAL_SEQLEN + EVAL_SEQLEN + 1)
        starts = range(0, tokens.numel() - 1, EVAL_SEQLEN)
        return [tokens[b : b + EVAL_SEQLEN] for b in list(starts)[: self.eval_windows]]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def log_budget_cut(stage: str, steps: int, planned: int, budget_s: float) -> str:
    """Say on the console that ``stage`` stopped at its wall-clock budget, with how much of the plan it ran."""
    msg = f"{stage}: cut by its time budget ({budget_s:.0f}s) after {steps} of {planned} planned steps"
    log(msg)
    return msg
