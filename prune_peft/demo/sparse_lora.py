"""The ``sparse_lora`` stage: recover the 2:4-pruned model with SparseLoRA through ``transformers.Trainer``, then merge.

Trains on the Shakespeare training split under a wall-clock budget (the demo must finish on 2 CPU cores), merges, and
reports perplexity dense / pruned / after training and the sparsity of the pruned layers before and after the merge
(identical — that is the point), plus a loss-curve plot.

What it prints is what happened: a stage cut by its time budget says so; a run in which no optimizer step had a
non-zero learning rate reports no recovery (the merged model is the pruned one); a loss curve of fewer than two
points is not drawn.
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
from ._context import DemoContext, log, log_budget_cut

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


def _plot_losses(history: list[dict], path: Path, title: str) -> Path | None:
    """Write the training-loss curve to ``path``; ``None`` (nothing written) when fewer than two losses were logged."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if len(points) < 2:  # one point is not a curve
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _time_budget(seconds: float):
    """A TrainerCallback that stops training once ``seconds`` of wall clock are spent (checked every step) and records
    the learning rate each optimizer step ran with (``lrs``)."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.stopped_early = False
            self.lrs: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:  # the rate this step's optimizer.step() will use (the scheduler steps after)
                self.lrs.append(float(optimizer.param_groups[0]["lr"]))

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_early = True
            return control

    return TimeBudget()


def training_summary(
    steps: int, planned: int, lrs: list[float], stopped_early: bool, budget_s: float, stage: str = "sparse_lora"
) -> dict:
    """What the training run did: steps, steps with a non-zero learning rate, and whether the budget cut it (said on
    the console)."""
    effective = sum(lr > 0 for lr in lrs[:steps])
    cut = log_budget_cut(stage, steps, planned, budget_s) if stopped_early else None
    return {"steps": steps, "planned_steps": planned, "effective_steps": effective, "time_budget_cut": cut}


def result_line(summary: dict, dense: float | None, pruned: float | None, after: float) -> tuple[str, float | None]:
    """The console's perplexity line and the recovered perplexity (``None`` when no step could change the model)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    head = f"perplexity dense {fmt(dense)} / 2:4 {fmt(pruned)}"
    if summary["effective_steps"] == 0:
        return (
            f"{head}; no recovery: none of the {summary['steps']} optimizer step(s) had a non-zero learning rate, so "
            f"the merged model is the 2:4 model (perplexity {after:.2f})",
            None,
        )
    change = "" if pruned is None else f", {after - pruned:+.2f} vs 2:4"
    return f"{head} / after {summary['effective_steps']} SparseLoRA step(s) {after:.2f}{change}", after


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
    # warmup from lr 0 only when there are steps to spare: a quick run's steps must all train
    batch, seqlen, max_steps, warmup = (2, 128, 2, 0) if ctx.quick else (4, 256, 60, 2)
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
            warmup_steps=warmup,
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
    summary = training_summary(steps, max_steps, budget_cb.lrs, budget_cb.stopped_early, budget)
    plot = _plot_losses(history, ctx.out / "sparse_lora_loss.png", f"SparseLoRA on 2:4 SmolLM2-135M ({steps} steps)")
    losses = [h["loss"] for h in history if "loss" in h]
    dense, pruned_ppl = ctx.report.get("load", {}).get("ppl_dense"), ctx.report.get("wanda_2:4", {}).get("ppl")
    line, recovered = result_line(summary, dense, pruned_ppl, ppl)
    loss_part = f"loss {losses[0]:.3f} → {losses[-1]:.3f}" if len(losses) > 1 else f"{len(losses)} loss logged"
    curve = f"loss curve {plot}" if plot else "no loss curve (fewer than two logged losses)"
    log(
        f"sparse_lora: {steps} Trainer steps in {train_seconds:.0f}s ({loss_part}); {line}; sparsity before merge "
        f"{before['sparsity']:.4f}, after {after['sparsity']:.4f} (2:4 valid {after['2:4_valid']}); {curve}"
    )
    return {
        "method": "SparseLoRA (SQFT SparsePEFT), transformers.Trainer",
        "rank": config.r,
        "trainable_params": trainable,
        "total_params": total,
        "batch": [batch, seqlen],
        "steps": steps,
        "planned_steps": max_steps,
        "effective_steps": summary["effective_steps"],
        "learning_rates": budget_cb.lrs,
        "stopped_by_time_budget": budget_cb.stopped_early,
        "time_budget_cut": summary["time_budget_cut"],
        "train_seconds": train_seconds,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "ppl_dense": dense,
        "ppl_pruned": pruned_ppl,
        "ppl_recovered": recovered,
        "ppl_after_merge": ppl,
        "sparsity_before_merge": before["sparsity"],
        "sparsity_after_merge": after["sparsity"],
        "sparsity_identical": before == after,
        "2:4_valid_after_merge": after["2:4_valid"],
        "loss_curve": str(plot) if plot else None,
        "adapter": str(adapter_dir),
    }
