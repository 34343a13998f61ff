"""Held-out perplexity (Shakespeare) and the sparsity report of a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._common import check_positive, print_json


@dataclass
class EvalOptions:
    model: str = field(
        default="smollm2-135m", metadata={"help": "Hub id, local path, or embedded alias (smollm2-135m)."}
    )
    seqlen: int = field(default=512, metadata={"help": "Tokens per perplexity window."})
    windows: int = field(default=16, metadata={"help": "Held-out windows for perplexity."})
    json: str | None = field(default=None, metadata={"help": "Also write the full report (per module) to this file."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (EvalOptions,)


def run(opts: EvalOptions) -> int:
    check_positive({"--seqlen": opts.seqlen, "--windows": opts.windows})

    from .._io import atomic_write_json
    from ..data import shakespeare_texts
    from ..evaluation import perplexity, sparsity_report
    from ..models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(opts.model)
    rep = sparsity_report(model)
    result = {
        "model": opts.model,
        "perplexity": perplexity(
            model, tok, shakespeare_texts("heldout"), seqlen=opts.seqlen, max_windows=opts.windows
        ),
        "sparsity": rep["sparsity"],
        "2:4_valid_modules": rep["2:4_valid_modules"],
        "modules": len(rep["modules"]),
    }
    if opts.json:
        atomic_write_json(opts.json, {**result, "sparsity_report": rep})
    print_json(result)
    return 0
