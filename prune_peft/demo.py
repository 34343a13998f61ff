"""The end-to-end demo that ``make demo`` runs on the embedded SmolLM2-135M model.

Stages append to one report (``<out>/report.json``, rewritten atomically after every stage so an interrupted
demo still leaves a valid report). Each stage is a function ``stage(ctx) -> dict`` in ``STAGES``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STAGES", "DemoContext", "run_demo"]


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
        from .evaluation import perplexity

        return perplexity(model, self.tokenizer, self.heldout_texts, seqlen=512, max_windows=self.eval_windows)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def stage_load(ctx: DemoContext) -> dict:
    from .data import shakespeare_texts
    from .models import load_model_and_tokenizer

    t0 = time.perf_counter()
    ctx.model, ctx.tokenizer = load_model_and_tokenizer("smollm2-135m")
    ctx.train_texts = shakespeare_texts("train")
    ctx.heldout_texts = shakespeare_texts("heldout")
    params = sum(p.numel() for p in ctx.model.parameters())
    ppl = ctx.ppl(ctx.model)
    _log(
        f"loaded SmolLM2-135M ({params / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f}s; "
        f"dense held-out perplexity {ppl:.2f}"
    )
    return {"params": params, "ppl_dense": ppl, "eval_windows": ctx.eval_windows, "eval_seqlen": 512}


def _prune_stage(ctx: DemoContext, name: str, method: str, **kwargs) -> dict:
    from .pruning.oneshot import prune

    model = copy.deepcopy(ctx.model)
    report = prune(
        model,
        method=method,
        calibration=ctx.train_texts,
        tokenizer=ctx.tokenizer,
        nsamples=ctx.nsamples,
        seqlen=512,
        **kwargs,
    )
    ppl = ctx.ppl(model)
    ctx.pruned[name] = model
    from .sparsity import is_nm_sparse

    nm_ok = all(is_nm_sparse(m.weight, 2, 4) for n, m in model.named_modules() if n in report.modules)
    _log(
        f"{name}: {method} {report.pattern} sparsity {report.sparsity:.4f}, 2:4 valid {nm_ok}, "
        f"perplexity {ppl:.2f}, {report.seconds:.1f}s"
    )
    return {
        "method": method,
        "pattern": report.pattern,
        "sparsity": report.sparsity,
        "2:4_valid": nm_ok,
        "ppl": ppl,
        "seconds": report.seconds,
        "calibration_samples": report.calibration_samples,
    }


def stage_wanda_24(ctx: DemoContext) -> dict:
    return _prune_stage(ctx, "wanda_2:4", "wanda", pattern="2:4")


def stage_sparsegpt_50(ctx: DemoContext) -> dict:
    return _prune_stage(ctx, "sparsegpt_50%", "sparsegpt", sparsity=0.5)


def stage_sparse_lora(ctx: DemoContext) -> dict:
    """Recover the 2:4 model with SparseLoRA through transformers.Trainer, merge, keep every zero."""
    from .tuners._demo import stage_sparse_lora as run

    return run(ctx)


def stage_loraprune(ctx: DemoContext) -> dict:
    """LoRAPrune: 20 % of heads and MLP channels pruned while LoRA fine-tuning, then compacted."""
    from .tuners.loraprune.demo import stage_loraprune as run

    return run(ctx)


STAGES = [
    ("load", stage_load),
    ("wanda_2:4", stage_wanda_24),
    ("sparsegpt_50%", stage_sparsegpt_50),
    ("sparse_lora", stage_sparse_lora),
    ("loraprune", stage_loraprune),
]


def run_demo(out: str | Path = "demo_out", quick: bool = False, stages: list[str] | None = None) -> dict:
    from .cli import write_json

    ctx = DemoContext(out=Path(out), quick=quick)
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, fn in STAGES:
        if stages is not None and name not in stages and name != "load":
            continue
        t0 = time.perf_counter()
        ctx.report[name] = fn(ctx)
        ctx.report[name]["stage_seconds"] = time.perf_counter() - t0
        write_json(ctx.out / "report.json", ctx.report)
    ctx.report["total_seconds"] = time.perf_counter() - start
    write_json(ctx.out / "report.json", ctx.report)
    _log(f"done in {ctx.report['total_seconds']:.0f}s; report written to {ctx.out / 'report.json'}")
    return ctx.report
