"""The one-shot stages: Wanda 2:4 and SparseGPT 50 % on a copy of the dense model (layer-by-layer calibration)."""

from __future__ import annotations

import copy

from ._context import DemoContext, log

__all__ = ["stage_sparsegpt_50", "stage_wanda_24"]


def _prune_stage(ctx: DemoContext, name: str, method: str, **kwargs) -> dict:
    from ..pruning.oneshot import prune
    from ..sparsity import is_nm_sparse

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
    nm_ok = all(is_nm_sparse(m.weight, 2, 4) for n, m in model.named_modules() if n in report.modules)
    log(
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
