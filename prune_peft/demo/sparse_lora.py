"""The ``sparse_lora`` stage: recover the 2:4-pruned model with SparseLoRA through ``transformers.Trainer``, then merge.

Trains on the Shakespeare training split under a wall-clock budget (the demo must finish on 2 CPU cores), merges, and
reports perplexity dense / pruned / recovered and the sparsity of the pruned layers before and after the merge
(identical — that is the point), plus a loss-curve plot.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import time
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_bytes
from ._context import DemoContext, log

__all__ = ["stage_sparse_lora"]

# ~5 minutes for the whole stage on 2 cores: training gets the bulk, evaluation and merging the rest
TRAIN_SECONDS = float(os.environ.get("PRUNE_PEFT_DEMO_TRAIN_SECONDS", 180))


def _pruned_layer_stats(model) -> dict:
    from ..sparsity import nm_violations

    zeros = total = valid = count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
            valid += nm_violations(w, 2, 4) == 0
            count += 1
    return {"sparsity": zeros / max(total, 1), "2:4_valid": f"{valid}/{count}"}


def _plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _time_budget(seconds: float):
    """A TrainerCallback that stops training once ``seconds`` of wall clock are spent (checked every step)."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.stopped_early = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_early = True
            return control

    return TimeBudget()


def stage_sparse_lora(ctx: DemoContext) -> dict:
    """Fine-tune ``ctx.pruned["wanda_2:4"]`` with SparseLoRA (Trainer), merge, and compare."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from ..data import calibration_tokens
    from ..tuners import SparseLoraConfig

    pruned = ctx.pruned.get("wanda_2:4")
    if pruned is None:
        raise RuntimeError("the sparse_lora stage needs the wanda_2:4 stage to run first")
    batch, seqlen, max_steps = (2, 128, 2) if ctx.quick else (4, 256, 60)
    budget = 30.0 if ctx.quick else TRAIN_SECONDS
    windows = calibration_tokens(ctx.train_texts, ctx.tokenizer, nsamples=batch * max_steps, seqlen=seqlen, seed=7)
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    before = _pruned_layer_stats(pruned)

    config = SparseLoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(copy.deepcopy(pruned), config)
    trainable, total = model.get_nb_trainable_parameters()
    budget_cb = _time_budget(budget)
    with tempfile.TemporaryDirectory() as run_dir:
        args = TrainingArguments(
            output_dir=run_dir,
            per_device_train_batch_size=batch,
            max_steps=max_steps,
            learning_rate=5e-4,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=DataCollatorForLanguageModeling(ctx.tokenizer, mlm=False),
            callbacks=[budget_cb],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    steps = trainer.state.global_step
    model.eval()
    adapter_dir = ctx.out / "sparse_lora_adapter"
    with atomic_dir(adapter_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)  # adapter + bit-packed masks + model card, swapped in complete
    merged = model.merge_and_unload()
    after = _pruned_layer_stats(merged)
    ppl = ctx.ppl(merged)
    plot = ctx.out / "sparse_lora_loss.png"
    _plot_losses(history, plot, f"SparseLoRA on 2:4 SmolLM2-135M ({steps} steps)")
    losses = [h["loss"] for h in history if "loss" in h]
    dense, pruned_ppl = ctx.report.get("load", {}).get("ppl_dense"), ctx.report.get("wanda_2:4", {}).get("ppl")
    log(
        f"sparse_lora: {steps} Trainer steps in {train_seconds:.0f}s "
        f"(loss {losses[0]:.3f} → {losses[-1]:.3f}); perplexity dense {dense:.2f} / 2:4 {pruned_ppl:.2f} / "
        f"recovered {ppl:.2f}; sparsity before merge {before['sparsity']:.4f}, after {after['sparsity']:.4f} "
        f"(2:4 valid {after['2:4_valid']}); loss curve {plot}"
    )
    return {
        "method": "SparseLoRA (SQFT SparsePEFT), transformers.Trainer",
        "rank": config.r,
        "trainable_params": trainable,
        "total_params": total,
        "batch": [batch, seqlen],
        "steps": steps,
        "stopped_by_time_budget": budget_cb.stopped_early,
        "train_seconds": train_seconds,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "ppl_dense": dense,
        "ppl_pruned": pruned_ppl,
        "ppl_recovered": ppl,
        "sparsity_before_merge": before["sparsity"],
        "sparsity_after_merge": after["sparsity"],
        "sparsity_identical": before == after,
        "2:4_valid_after_merge": after["2:4_valid"],
        "loss_curve": str(plot),
        "adapter": str(adapter_dir),
    }
