"""One-shot prune a model (magnitude, Wanda, SparseGPT) layer by layer, report perplexity, and save it.

The output folder is written atomically: it holds the pruned model, its tokenizer and prune_report.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._common import UsageError, print_json
from .eval import EVAL_SEQLEN, EVAL_WINDOWS


@dataclass
class PruneOptions:
    model: str = field(
        default="smollm2-135m", metadata={"help": "Hub id, local path, or embedded alias (smollm2-135m)."}
    )
    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="wanda", metadata={"help": "Pruning criterion: magnitude, wanda or sparsegpt."}
    )
    sparsity: float | None = field(
        default=None, metadata={"help": "Fraction of weights removed, in [0, 1); implied by --pattern N:M."}
    )
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or 'N:M' (N kept of every M)."})
    sparsity_profile: Literal["uniform", "owl"] = field(
        default="uniform",
        metadata={
            "help": "Layer sparsities: 'uniform', or 'owl' (outlier-weighed layerwise sparsity, Yin et al. 2023; "
            "wanda/sparsegpt, unstructured; the mean sparsity stays --sparsity)."
        },
    )
    owl_m: float = field(default=5.0, metadata={"help": "OWL's outlier threshold multiplier M (paper: 5)."})
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL's λ: layer sparsities span a band of width 2λ (paper: 0.08)."}
    )
    calibration: str = field(
        default="shakespeare", metadata={"help": "Calibration text: 'shakespeare', a .txt file, or a saved dataset."}
    )
    nsamples: int = field(default=64, metadata={"help": "Calibration sequences."})
    seqlen: int = field(
        default=512,
        metadata={"help": "Tokens per calibration sequence (the perplexity window is --eval-seqlen)."},
    )
    include: list[str] | None = field(default=None, metadata={"help": "Glob patterns of module names to prune."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Glob patterns of module names kept dense."})
    eval_seqlen: int = field(
        default=EVAL_SEQLEN, metadata={"help": "Tokens per perplexity window (the default of `eval --seqlen`)."}
    )
    eval_windows: int = field(
        default=EVAL_WINDOWS,
        metadata={"help": "Held-out windows for perplexity before/after (0 = skip; the default of `eval --windows`)."},
    )
    out: str | None = field(default=None, metadata={"help": "Output folder (required)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --out."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (PruneOptions,)


def calibration_texts(spec: str):
    """'shakespeare' → the training split; a .txt file → its paragraphs; otherwise a datasets path on disk."""
    import os

    from ..data import shakespeare_texts

    if spec == "shakespeare":
        return shakespeare_texts("train")
    if spec.endswith(".txt") and os.path.isfile(spec):
        text = Path(spec).read_text()
        return [p for p in text.split("\n\n") if p.strip()]
    if not os.path.exists(spec):
        raise UsageError(
            f"--calibration={spec!r}: no such file or folder; pass 'shakespeare', a .txt file or a saved dataset folder"
        )
    from datasets import load_from_disk

    return load_from_disk(spec)


def run(opts: PruneOptions) -> int:
    from .._io import atomic_dir, atomic_write_json, check_output_dir
    from ..pruning.oneshot import check_prune_args

    # bad input fails before the model loads
    check_prune_args(
        opts.method, opts.sparsity, opts.pattern, None, opts.sparsity_profile, opts.owl_m, opts.owl_lambda
    )
    if opts.out is None:
        raise UsageError("--out is required (the folder the pruned model is saved to)")
    check_output_dir(opts.out, overwrite=opts.overwrite, name="--out")
    for arg, value in (("--seqlen", opts.seqlen), ("--nsamples", opts.nsamples)):
        if not isinstance(value, int) or value <= 0:
            raise UsageError(f"{arg} must be a positive integer, got {value!r}")
    if opts.seqlen < 2:  # a perplexity window scores tokens 2..seqlen; checked before the model loads
        raise UsageError(f"--seqlen must be >= 2, got {opts.seqlen}")
    if not isinstance(opts.eval_seqlen, int) or opts.eval_seqlen < 2:
        raise UsageError(
            f"--eval-seqlen must be an integer >= 2 (a window scores tokens 2..seqlen), got {opts.eval_seqlen!r}"
        )
    if opts.eval_windows is not None and opts.eval_windows < 0:
        raise UsageError(f"--eval-windows must be >= 0, got {opts.eval_windows!r}")

    from ..data import shakespeare_texts
    from ..evaluation import perplexity
    from ..models import check_model_source, load_model_and_tokenizer
    from ..pruning.oneshot import prune

    check_model_source(opts.model, name="--model")
    calibration = None if opts.method == "magnitude" else calibration_texts(opts.calibration)
    if calibration is not None and len(calibration) == 0:
        raise UsageError(f"--calibration={opts.calibration!r} holds no text; pass a non-empty file or dataset")
    model, tok = load_model_and_tokenizer(opts.model)
    # the evaluation window is independent of the calibration one, with `eval`'s defaults: the same checkpoint gets
    # the same perplexity from `prune` and `eval`
    result: dict[str, Any] = {"model": opts.model, "eval_seqlen": opts.eval_seqlen, "eval_windows": opts.eval_windows}
    heldout = shakespeare_texts("heldout")
    if opts.eval_windows:
        result["ppl_dense"] = perplexity(model, tok, heldout, seqlen=opts.eval_seqlen, max_windows=opts.eval_windows)
    report = prune(
        model,
        method=opts.method,
        sparsity=opts.sparsity,
        pattern=opts.pattern,
        calibration=calibration,
        tokenizer=tok,
        nsamples=opts.nsamples,
        seqlen=opts.seqlen,
        include=opts.include,
        exclude=opts.exclude,
        sparsity_profile=opts.sparsity_profile,
        owl_m=opts.owl_m,
        owl_lambda=opts.owl_lambda,
    )
    if opts.eval_windows:
        result["ppl_pruned"] = perplexity(model, tok, heldout, seqlen=opts.eval_seqlen, max_windows=opts.eval_windows)
    result["prune"] = report.to_dict()
    with atomic_dir(opts.out, overwrite=opts.overwrite, name="--out") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "prune_report.json", result)
    summary = {k: v for k, v in result.items() if k != "prune"}
    summary.update(sparsity=report.sparsity, nm_valid=report.nm_valid, seconds=round(report.seconds, 1))
    print_json(summary)
    return 0
