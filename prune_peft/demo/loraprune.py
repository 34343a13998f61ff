"""The ``loraprune`` stage of ``make demo``: LoRAPrune on the embedded model through transformers.Trainer."""

from __future__ import annotations

import copy
import time

from ._context import DemoContext, log

__all__ = ["stage_loraprune"]


def stage_loraprune(ctx: DemoContext) -> dict:
    """20 % of the MLP channels pruned (the same kept count in every block: ``uniform=True``) while LoRA fine-tuning,
    then merge → compact → perplexity. Attention heads are kept: one KV unit of SmolLM2's three is a third of the
    attention, which the uniform rounding cannot go below. The adapter model stays in ``ctx.pruned["loraprune_peft"]``
    for the export stage (stock-loadable compacted checkpoint)."""
    import tempfile

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from ..callbacks.prune import PruneCallback
    from ..evaluation import tokenize_stream
    from ..pruning.structured import compact, compacted_shapes
    from ..tuners import LoRAPruneConfig

    steps, seqlen, batch = (6, 128, 2) if ctx.quick else (24, 128, 4)
    stream = tokenize_stream(ctx.train_texts, ctx.tokenizer, max_tokens=seqlen * batch * steps)
    n = stream.numel() // seqlen
    rows = [{"input_ids": w.tolist()} for w in stream[: n * seqlen].reshape(n, seqlen)]

    def collate(items):
        ids = torch.tensor([r["input_ids"] for r in items])
        return {"input_ids": ids, "labels": ids.clone()}

    dense = copy.deepcopy(ctx.model)
    params_dense = sum(p.numel() for p in dense.parameters())
    model = get_peft_model(
        dense, LoRAPruneConfig(r=8, target_sparsity=0.2, structure="channel", prune_every=2, uniform=True)
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-4,
            logging_steps=steps, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[PruneCallback()]
        )
        trainer.train()
    seconds = time.perf_counter() - t0
    logged = [h for h in trainer.state.log_history if "prune/target_sparsity" in h][-1]
    ctx.pruned["loraprune_peft"] = model
    small = compact(copy.deepcopy(model).merge_and_unload())  # the adapter model is kept for the export stage
    ppl = ctx.ppl(small)
    params = sum(p.numel() for p in small.parameters())
    log(
        f"loraprune: {steps} steps in {seconds:.0f}s, pruned {int(logged.get('prune/pruned_heads', 0))} heads and "
        f"{int(logged['prune/pruned_channels'])} MLP channels; compacted {params_dense / 1e6:.1f} M → "
        f"{params / 1e6:.1f} M params, perplexity {ppl:.2f}"
    )
    return {
        "steps": steps,
        "train_seconds": seconds,
        "params_dense": params_dense,
        "params_compacted": params,
        "ppl": ppl,
        "layers": compacted_shapes(small),  # None: one size for every block (a stock config)
        "config": {
            k: getattr(small.config, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        },
        **{k: v for k, v in logged.items() if k.startswith("prune/")},
    }
