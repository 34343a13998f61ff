"""The ``load`` stage: the embedded SmolLM2-135M, the Shakespeare texts, and the dense perplexity."""

from __future__ import annotations

import time

from ._context import DemoContext, log

__all__ = ["stage_load"]


def stage_load(ctx: DemoContext) -> dict:
    from ..data import shakespeare_texts
    from ..models import load_model_and_tokenizer

    t0 = time.perf_counter()
    ctx.model, ctx.tokenizer = load_model_and_tokenizer("smollm2-135m")
    ctx.train_texts = shakespeare_texts("train")
    ctx.heldout_texts = shakespeare_texts("heldout")
    params = sum(p.numel() for p in ctx.model.parameters())
    ppl = ctx.ppl(ctx.model)
    log(
        f"loaded SmolLM2-135M ({params / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f}s; "
        f"dense held-out perplexity {ppl:.2f}"
    )
    return {"params": params, "ppl_dense": ppl, "eval_windows": ctx.eval_windows, "eval_seqlen": 512}
