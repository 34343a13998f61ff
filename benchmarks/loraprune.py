"""LoRAPrune benchmark on SmolLM2-135M: cost vs plain LoRA and vs full-weight-gradient importance; quality.

Cost (batch ``--batch`` × ``--seqlen``, default 4 × 256, transformers.Trainer, LoRA r=8 on q/k/v/o/gate/up/down,
AdamW over the LoRA parameters only; all three configurations in this one process, interleaved):

- ``lora``         plain peft LoRA;
- ``loraprune``    LoRAPrune + PruneCallback: importance from LoRA weights and gradients at every step, pruning
                   events inside the measured window;
- ``grad``         the same with importance from the *true* base-weight gradients (LLM-Pruner style: the base weights
                   of the adapted layers require grad; the optimizer still only updates LoRA).

Time: ``--rounds`` rounds; in each, every configuration runs ``--steps-per-run`` Trainer steps (the first untimed),
in an order that rotates every round, so machine load hits all alike. Each round gives one pair per ratio; the
median and spread over the rounds are reported (goal: LoRAPrune ≤ 1.10× LoRA).
Memory: one fresh process per configuration, measured as ``_bench.MEMORY_METHOD`` says (peak RSS, and "training
memory" = peak RSS minus the RSS with the model loaded), at the benchmark shape and at 1 × 128, where weights rather
than activations dominate (goals: LoRAPrune ≤ 1.05× LoRA; ≤ 0.6× the full-gradient baseline — the paper reports
−52.6 % on LLaMA-7B). Each memory process also records (``MemoryProbe``) where its peak occurs (setup = loading and
copying the model, or a training phase), the RSS when the importance is scored, and the gradient bytes each importance
mode holds then (``importance_grad_mb``, ``live_grad_mb``, read from the live ``.grad`` tensors): at 135 M parameters
the activations at the start of the backward pass can hide the base-weight gradients from the peak RSS, so the
gradient bytes are the measure of the paper's memory claim that does not depend on the shape.

Agreement (``--agreement``, a tiny model, seconds): Spearman correlation of LoRA-guided vs true-gradient importance
over the first LoRA steps, at several ranks and learning rates (``run_agreement``).

Quality (``--quality-steps`` optimizer steps of batch ``--quality-batch`` × ``--seqlen`` on Shakespeare, then held-out
perplexity of the compacted model) at 20 % and 50 % structured sparsity (GQA units + MLP channels, first 10 % and last
block kept): LoRAPrune vs one-shot structured magnitude pruning (|W| per unit/channel, same grouping and
normalisation) followed by LoRA with the same steps.

    python benchmarks/loraprune.py                  # ≈ 10 min on 2 busy CPU cores
    python benchmarks/loraprune.py --quick          # a smoke run (results/quick/)
    python benchmarks/loraprune.py --agreement --skip-cost --skip-quality --quick   # the agreement diagnostic only

Writes benchmarks/results/loraprune.json, stamped by ``_bench.write_results``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _bench import (
    MEMORY_METHOD,
    memory_record,
    paired,
    peak_rss_mb,
    reset_peak_rss,
    results_path,
    rss_mb,
    run_memory_worker,
    start_stamp,
    write_results,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _windows(tokenizer, seqlen: int, n: int):
    from prune_peft.data import shakespeare_texts
    from prune_peft.evaluation import tokenize_stream

    stream = tokenize_stream(shakespeare_texts("train"), tokenizer, max_tokens=seqlen * n)
    k = stream.numel() // seqlen
    return [{"input_ids": w.tolist()} for w in stream[: k * seqlen].reshape(k, seqlen)]


def _collate(rows):
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def _targets():
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------------------ cost

CONFIGS = ("lora", "loraprune", "grad")


def _peft_model(config: str, base):
    """``config`` on a copy of ``base``: (peft model, callback classes to instantiate per Trainer run)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from prune_peft import LoRAPruneConfig, PruneCallback

    base = copy.deepcopy(base)
    if config == "lora":
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=_targets())), []
    importance = "grad" if config == "grad" else "lora"
    cfg = LoRAPruneConfig(r=8, target_sparsity=0.5, importance=importance, prune_every=2, warmup=0.0)
    model = get_peft_model(base, cfg)
    if config == "grad":  # LLM-Pruner style: the base weights of the adapted layers get gradients
        for name, p in model.named_parameters():
            if "base_layer.weight" in name:
                p.requires_grad_(True)
    return model, [PruneCallback]


def _train(model, callback_types, data, batch: int, steps: int, optimizer, clock=None):
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, report_to=[], save_strategy="no",
            logging_steps=steps, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        )  # fmt: skip
        callbacks = [cb() for cb in callback_types] + ([clock] if clock is not None else [])
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate, callbacks=callbacks,
                          optimizers=(optimizer, None))  # fmt: skip
        trainer.train()
    return trainer


def run_timing(args) -> dict:
    """All three configurations in this one process, interleaved: ``--rounds`` rounds, each running every
    configuration for ``--steps-per-run`` Trainer steps (the first untimed) in an order that rotates every round.
    Each round gives one pair per ratio (median step time of the numerator / of the denominator in that round)."""
    import torch
    from transformers import TrainerCallback

    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("smollm2-135m")
    steps = args.steps_per_run
    data = _windows(tok, args.seqlen, args.batch * steps)
    setups = {}
    for config in CONFIGS:
        model, cbs = _peft_model(config, base)
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        setups[config] = (model, cbs, torch.optim.AdamW(lora_params, lr=2e-4))  # same optimizer state everywhere
    del base

    class Clock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.wall.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    for config in CONFIGS:  # one untimed run each: one-time costs (allocator, first pruning setup) stay out
        model, cbs, opt = setups[config]
        _train(model, cbs, data, args.batch, steps, opt)
    per_round: list[dict] = []
    step_times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu_times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    pruned = {}
    for r in range(args.rounds):
        order = list(CONFIGS[r % 3 :] + CONFIGS[: r % 3])
        medians = {}
        for config in order:
            model, cbs, opt = setups[config]
            clock = Clock()
            trainer = _train(model, cbs, data, args.batch, steps, opt, clock)
            timed_wall, timed_cpu = clock.wall[1:], clock.cpu[1:]  # first step of each run: warm-up
            step_times[config] += timed_wall
            cpu_times[config] += timed_cpu
            medians[config] = (statistics.median(timed_wall), statistics.median(timed_cpu))
            if cbs:
                logged = [h for h in trainer.state.log_history if "prune/pruned_channels" in h]
                pruned[config] = logged[-1]["prune/pruned_channels"] if logged else None
        per_round.append({"order": order, "median_step_s": {c: m[0] for c, m in medians.items()},
                          "median_step_cpu_s": {c: m[1] for c, m in medians.items()}})  # fmt: skip
        print(f"[time] round {r}: " + ", ".join(f"{c} {medians[c][0]:.2f}s" for c in CONFIGS), flush=True)

    def pairs(num: str, den: str, key: str = "median_step_s") -> dict:
        return paired([x[key][num] / x[key][den] for x in per_round], f"{num} step", f"{den} step")

    return {
        "time": {
            c: {
                "step_seconds_median": statistics.median(step_times[c]),
                "step_seconds": step_times[c],
                "step_cpu_seconds_median": statistics.median(cpu_times[c]),
                **({"pruned_channels": pruned[c]} if c in pruned else {}),
            }
            for c in CONFIGS
        },
        "rounds": per_round,
        "paired": {
            "loraprune_vs_lora_time": pairs("loraprune", "lora"),
            "loraprune_vs_lora_cpu_time": pairs("loraprune", "lora", "median_step_cpu_s"),
            "loraprune_vs_grad_time": pairs("loraprune", "grad"),
        },
    }


class MemoryProbe:
    """Where the peak RSS of a training run occurs, and the gradients the importance mode keeps alive when it scores.

    A TrainerCallback (built by :func:`memory_probe`; placed *before* PruneCallback in the callback list, so its
    ``on_pre_optimizer_step`` sees the gradients before the pruner scores and, with ``importance="grad"``, drops the
    base gradients). Per optimizer step it records

    - ``phase_peak_mb``: the peak RSS of each phase — ``forward`` (step begin → the model's forward returns, a
      forward hook), ``backward`` (→ ``on_pre_optimizer_step``), ``update`` (importance scoring, optimizer step, mask
      update → ``on_step_end``) and ``other`` (Trainer setup, between steps, teardown) — by resetting the kernel's
      high-water mark at each boundary (Linux clear_refs);
    - ``importance_grad_mb``: bytes of the live ``.grad`` tensors the importance formula reads at the scoring point
      (``lora``: ∂L/∂A and ∂L/∂B of the adapted layers; ``grad``: ∂L/∂W of their base weights), read from the tensors
      themselves, not computed from shapes;
    - ``live_grad_mb``: bytes of every live ``.grad`` at that point (the LoRA gradients training needs anyway included);
    - ``rss_at_scoring_mb``: the RSS at that point (model, gradients, optimizer state; the activations are freed), to
      set against the phase peaks: gradients that fit under the peak of an earlier phase cannot raise the peak.
    """

    PHASES = ("forward", "backward", "update", "other")

    def __init__(self, model, importance: str | None) -> None:
        self.model, self.importance = model, importance
        self.steps: list[dict] = []
        self.setup_peak_mb: float | None = None
        try:
            self.setup_peak_mb = peak_rss_mb()  # loading, copying and paging in the model
            reset_peak_rss()
            self.enabled = True
        except OSError:  # no clear_refs (not Linux, or restricted): gradient bytes only
            self.enabled = False
        self._current: dict = {}
        self._other_mb = 0.0
        self._hook = model.register_forward_hook(self._forward_done)

    def _mark(self, phase: str) -> None:
        if self.enabled:
            self._current.setdefault("phase_peak_mb", {})[phase] = peak_rss_mb()
            reset_peak_rss()

    def _forward_done(self, module, inputs, output) -> None:
        self._mark("forward")

    def _grad_mb(self, wanted) -> float:
        seen, total = set(), 0
        for name, p in self.model.named_parameters():
            g = p.grad
            if g is not None and wanted(name) and g.data_ptr() not in seen:
                seen.add(g.data_ptr())
                total += g.numel() * g.element_size()
        return total / 2**20

    def on_step_begin(self, *args, **kwargs) -> None:
        if self.enabled:  # since the last mark: Trainer setup or the gap between steps
            self._other_mb = max(self._other_mb, peak_rss_mb())
            reset_peak_rss()
        self._current = {}

    def on_pre_optimizer_step(self, *args, **kwargs) -> None:
        self._mark("backward")
        if self.importance == "grad":
            reads = lambda n: "base_layer.weight" in n  # noqa: E731
        elif self.importance == "lora":
            reads = lambda n: "lora_A" in n or "lora_B" in n  # noqa: E731
        else:
            reads = lambda n: False  # noqa: E731
        self._current["importance_grad_mb"] = self._grad_mb(reads)
        self._current["live_grad_mb"] = self._grad_mb(lambda n: True)
        self._current["rss_at_scoring_mb"] = rss_mb()

    def on_step_end(self, *args, **kwargs) -> None:
        self._mark("update")
        self.steps.append(self._current)

    def summary(self) -> dict:
        """Maxima over the recorded steps; ``peak_rss_mb`` = the process's peak (setup and every phase), the value
        VmHWM would give without the resets."""
        self._hook.remove()
        out: dict = {
            "importance_grad_mb": max((s["importance_grad_mb"] for s in self.steps), default=0.0),
            "live_grad_mb": max((s["live_grad_mb"] for s in self.steps), default=0.0),
            "rss_at_scoring_mb": max((s["rss_at_scoring_mb"] for s in self.steps), default=0.0),
        }
        if self.enabled:
            self._other_mb = max(self._other_mb, peak_rss_mb())  # teardown since the last step
            peaks = {ph: max(s.get("phase_peak_mb", {}).get(ph, 0.0) for s in self.steps) for ph in self.PHASES[:3]}
            peaks["other"] = self._other_mb
            out["phase_peak_rss_mb"] = {"setup": self.setup_peak_mb, **peaks}
            out["peak_phase"] = max(out["phase_peak_rss_mb"], key=out["phase_peak_rss_mb"].get)
            out["peak_rss_mb"] = max(out["phase_peak_rss_mb"].values())
            out["training_peak_rss_mb"] = max(peaks.values())
        return out


def memory_probe(model, importance: str | None):
    """A :class:`MemoryProbe` that is a ``transformers.TrainerCallback`` (imported lazily, like the rest)."""
    from transformers import TrainerCallback

    class _Probe(MemoryProbe, TrainerCallback):
        pass

    return _Probe(model, importance)


def memory_worker(config: str, args) -> dict:
    """One configuration in a fresh process (``_bench.MEMORY_METHOD``): peak RSS of a 2-step training run, where it
    occurs (setup = loading and copying the model, or a training phase) and the importance gradients alive at the
    scoring point (:class:`MemoryProbe`)."""
    import torch

    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("smollm2-135m")
    model, cbs = _peft_model(config, base)
    del base
    with torch.no_grad():  # page the weights in before the baseline
        for p in model.parameters():
            p.add_(0)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=2e-4)
    data = _windows(tok, args.seqlen, args.batch * 2)
    baseline = rss_mb()
    probe = memory_probe(model, {"lora": None, "loraprune": "lora", "grad": "grad"}[config])
    _train(model, [lambda: probe, *cbs], data, args.batch, 2, optimizer)  # the probe first: it sees the grads
    mem = memory_record(baseline)
    probed = probe.summary()
    peak = probed.get("peak_rss_mb", mem["peak_rss_mb"])  # VmHWM was reset by the probe: its maximum is the peak
    return {
        "config": config,
        "peak_rss_mb": peak,
        "model_rss_mb": baseline,
        "training_mb": peak - baseline,
        "importance_grad_mb": probed["importance_grad_mb"],
        "live_grad_mb": probed["live_grad_mb"],
        "rss_at_scoring_mb": probed["rss_at_scoring_mb"],
        **{k: probed[k] for k in ("training_peak_rss_mb", "phase_peak_rss_mb", "peak_phase") if k in probed},
    }


MEMORY_KEYS = ("peak_rss_mb", "model_rss_mb", "training_mb")
# MemoryProbe's fields (absent where /proc/self/clear_refs is not writable: then only the gradient bytes)
PROBE_KEYS = (
    "importance_grad_mb",
    "live_grad_mb",
    "rss_at_scoring_mb",
    "training_peak_rss_mb",
    "phase_peak_rss_mb",
    "peak_phase",
)


def run_cost(args) -> dict:
    """Interleaved timing in this process, then one memory process per configuration at 4 × 256 and at 1 × 128."""
    results = run_timing(args)
    results["memory"] = {}
    for batch, seqlen in [(args.batch, args.seqlen), (1, 128)]:
        key = f"{batch}x{seqlen}"
        results["memory"][key] = {}
        for config in CONFIGS:
            cmd = [__file__, "--worker", config, "--batch", str(batch), "--seqlen", str(seqlen)]
            r = run_memory_worker(cmd, args.threads)
            results["memory"][key][config] = {k: r[k] for k in (*MEMORY_KEYS, *PROBE_KEYS) if k in r}
            print(f"[memory {key}] {config:10s} peak RSS {r['peak_rss_mb']:.0f} MB (training {r['training_mb']:.0f} MB)",
                  flush=True)  # fmt: skip
    ratios = {k: v["median"] for k, v in results["paired"].items()}
    for key, m in results["memory"].items():
        for other in ("lora", "grad"):
            ratios[f"loraprune_vs_{other}_peak_rss@{key}"] = m["loraprune"]["peak_rss_mb"] / m[other]["peak_rss_mb"]
            ratios[f"loraprune_vs_{other}_training_memory@{key}"] = (
                m["loraprune"]["training_mb"] / m[other]["training_mb"]
            )
        if m["grad"].get("live_grad_mb"):  # the gradient state each importance mode holds when it scores
            ratios[f"loraprune_vs_grad_live_grad@{key}"] = m["loraprune"]["live_grad_mb"] / m["grad"]["live_grad_mb"]
    results["ratios"] = ratios
    results["memory_method"] = MEMORY_METHOD
    results["ratio_definitions"] = {
        "*_time": "median over rounds of (numerator's median step time / denominator's, same round, same process)",
        "*_peak_rss@BxT": "numerator process peak RSS / denominator process peak RSS (both include the model)",
        "*_training_memory@BxT": "numerator extra_mb / denominator extra_mb (peak RSS − RSS with the model loaded)",
        "*_live_grad@BxT": "numerator / denominator bytes of every live .grad at the scoring point "
        "(on_pre_optimizer_step, before the pruner scores), read from the tensors",
    }
    return results


# --------------------------------------------------------------------------------------------------------- profile

PHASES = ("forward", "backward", "importance", "optimizer", "mask_update", "zero_grad")


def _phase_loop(model, optimizer, batches, pruning: bool) -> dict[str, list[tuple[float, float]]]:
    """The plain loop, one phase at a time: (wall s, CPU s) of each phase per step (LoRA: no importance/mask)."""

    times: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}

    def timed(phase, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[phase].append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    model.train()
    for step, batch in enumerate(batches):
        loss = timed("forward", lambda b=batch: model(**b).loss)
        timed("backward", loss.backward)
        if pruning:
            timed("importance", lambda s=step: model.base_model.update_importance(s))
        timed("optimizer", optimizer.step)
        if pruning:
            timed("mask_update", lambda s=step: model.base_model.update_and_allocate(s))
        timed("zero_grad", lambda: optimizer.zero_grad(set_to_none=True))
    return times


def _op_profile(fn) -> dict:
    """torch.profiler over one call of ``fn``: op count, CPU time (self, summed over ops) and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total_self_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "ops": int(sum(e.count for e in events)),
        "self_cpu_ms": total_self_us / 1e3,
        "top": [{"op": e.key, "count": int(e.count), "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top],
        "counts": {e.key: int(e.count) for e in events},
    }


def run_profile(args) -> dict:
    """Per-phase breakdown of one LoRAPrune step vs plain LoRA (plain loop, same batches), the PruneCallback's own
    time in a Trainer run, and torch.profiler op counts of the importance phase against forward + backward.

    Phases are timed with wall and CPU clocks (median over the timed steps; the first step is untimed). The shares
    that matter on a loaded machine are the CPU-time ones and the profiler's op counts.
    """
    import torch
    from transformers import TrainerCallback

    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("smollm2-135m")
    steps = args.steps_per_run
    data = _windows(tok, args.seqlen, args.batch * steps)
    batches = [_collate(data[i : i + args.batch]) for i in range(0, args.batch * steps, args.batch)]
    out: dict = {"phases": {}, "settings": {"batch": args.batch, "seqlen": args.seqlen, "steps": steps,
                                            "threads": args.threads, "order": "lora, loraprune, loraprune, lora"}}  # fmt: skip
    models, times = {}, {}
    for config in ("lora", "loraprune"):
        model, _ = _peft_model(config, base)
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=2e-4)
        models[config] = (model, opt)
        times[config] = {p: [] for p in PHASES}
    for config in ("lora", "loraprune", "loraprune", "lora"):  # ABBA: drift in machine load hits both alike
        model, opt = models[config]
        if config == "loraprune":
            model.base_model.prepare_pruning(total_steps=steps)
        run = _phase_loop(model, opt, batches, pruning=config == "loraprune")
        for p, v in run.items():
            times[config][p] += v[1:]  # each run's first step: warm-up
    for config, phases in times.items():
        out["phases"][config] = {
            p: {"wall_s": statistics.median(t[0] for t in v), "cpu_s": statistics.median(t[1] for t in v)}
            for p, v in phases.items()
            if v
        }
    models = {k: v[0] for k, v in models.items()}
    lp = out["phases"]["loraprune"]
    step_cpu = sum(v["cpu_s"] for v in lp.values())
    out["cpu_share"] = {p: v["cpu_s"] / step_cpu for p, v in lp.items()}
    fb = lp["forward"]["cpu_s"] + lp["backward"]["cpu_s"]
    out["importance_vs_forward_backward_cpu"] = lp["importance"]["cpu_s"] / fb
    out["mask_update_vs_forward_backward_cpu"] = lp["mask_update"]["cpu_s"] / fb
    lo = out["phases"]["lora"]
    out["loraprune_vs_lora_cpu"] = {p: lp[p]["cpu_s"] / lo[p]["cpu_s"] for p in lo if lo[p]["cpu_s"] > 0}
    out["loraprune_vs_lora_step_cpu"] = step_cpu / sum(v["cpu_s"] for v in lo.values())

    # op counts: one forward+backward and one importance pass of the LoRAPrune model (gradients present)
    model = models["loraprune"]
    model.zero_grad(set_to_none=True)
    fwd_bwd = _op_profile(lambda: model(**batches[0]).loss.backward())
    pruner = model.base_model.pruner()
    pruner._scored_step = -1  # score the same gradients again, outside the schedule bookkeeping
    importance = _op_profile(pruner._accumulate)
    metrics = _op_profile(pruner.metrics)
    out["profiler"] = {"forward_backward": fwd_bwd, "importance": importance, "metrics": metrics,
                       "importance_vs_forward_backward_self_cpu": importance["self_cpu_ms"] / fwd_bwd["self_cpu_ms"]}  # fmt: skip

    # the PruneCallback's own time inside a Trainer run: clocks on either side of it in the callback list
    from prune_peft import PruneCallback

    events = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log")
    spent: dict[str, float] = {}

    class Before(TrainerCallback):
        pass

    class After(TrainerCallback):
        pass

    for ev in events:

        def start(self, *a, _ev=ev, **k):
            self.t0 = time.process_time()

        def stop(self, *a, _ev=ev, **k):
            spent[_ev] = spent.get(_ev, 0.0) + time.process_time() - before.t0

        setattr(Before, ev, start)
        setattr(After, ev, stop)
    before, after = Before(), After()
    model, _ = _peft_model("loraprune", base)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=2e-4)
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=args.batch, report_to=[], save_strategy="no",
            logging_steps=1, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        )  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate,
                callbacks=[before, PruneCallback(), after], optimizers=(opt, None)).train()  # fmt: skip
    out["callback_cpu_s_per_step"] = {ev: v / steps for ev, v in spent.items()}
    return out


# ------------------------------------------------------------------------------------------------------- agreement

AGREEMENT_ARMS = {  # arm → (LoRA rank r, learning rate, LoRA steps); lora_alpha = 2r (scale 2, as r=8/alpha=16)
    "r=8, lr 5e-4 (the quality run's)": (8, 5e-4, 24),
    "r=1, lr 5e-4": (1, 5e-4, 24),
    "r=32, lr 5e-4": (32, 5e-4, 24),
    "r=8, lr 5e-3 (B grows 10x faster)": (8, 5e-3, 24),
}


def _spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson correlation of their ranks; no tie correction)."""

    rx, ry = (t.argsort().argsort().double() for t in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()).clamp_min(1e-12))


def _bottom_overlap(est, true, fraction: float) -> float:
    """Fraction of the groups the true scores would prune (the lowest ``fraction``) that the estimate prunes too."""
    k = max(1, round(fraction * true.numel()))
    a, b = set(est.argsort()[:k].tolist()), set(true.argsort()[:k].tolist())
    return len(a & b) / k


def run_agreement(args) -> dict:
    """Does LoRA-guided importance rank channels as the true first-order Taylor importance does? (tiny model)

    A tiny Llama (prune_peft.testing; hidden 128, 6 blocks, intermediate 256, 8 heads / 4 KV heads) is first trained
    in full for ``--agreement-pretrain`` steps on Shakespeare bytes (so its weights carry structure), then each arm of
    :data:`AGREEMENT_ARMS` trains a LoRAPrune adapter (no pruning) with the *base weights also receiving gradients*,
    so every step scores the same gradients three ways with the library's own ``channel_scores``: LoRA-guided
    (Ĝ = G_B·A + B·G_A − G_B·G_A), true ∂L/∂W (``importance="grad"``) and magnitude |W + sBA|. Recorded per step:

    - ``rows`` / ``cols``: Spearman correlation, LoRA-guided vs true, of the per-module score vectors, averaged over
      the row-scored modules (q/k/v/gate/up: output channels) and the column-scored ones (o/down: input channels);
    - ``cosine``: cos(Ĝ, ∂L/∂W) of the whole gradient matrices, averaged over modules (B = 0 at the start gives
      Ĝ = s·∂L/∂W·AᵀA, a rank-r projection of the true gradient on A's row space);
    - ``channels_ema``: Spearman of the MLP channel-group scores after the moving average (β 0.9, as the pruner),
      LoRA-guided vs true and magnitude vs true, averaged over prunable blocks, and ``overlap_20/50``: the share of the
      channels the true scores would prune at 20 % / 50 % that the LoRA-guided (or magnitude) scores prune too;
    - ``B_over_A``: ‖B‖/‖A‖ averaged over modules (how far B has grown from its zero start).
    """
    import copy

    import torch
    from peft import get_peft_model

    from prune_peft import LoRAPruneConfig
    from prune_peft.sparsity.loraprune import channel_scores, estimate_weight_grad, moving_average, normalize_scores
    from prune_peft.testing import byte_tokenizer, tiny_causal_lm

    torch.manual_seed(0)
    seqlen, batch = 64, 4
    base = tiny_causal_lm("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seqlen)  # fmt: skip
    tok = byte_tokenizer()
    most = max(s for _, _, s in AGREEMENT_ARMS.values())
    rows = _windows(tok, seqlen, batch * (args.agreement_pretrain + most))
    batches = [_collate(rows[i : i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    pre, tune = batches[: args.agreement_pretrain], batches[args.agreement_pretrain :]
    base.train()
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    losses = []
    for b in pre:
        loss = base(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    out: dict = {
        "model": "tiny llama: hidden 128, 6 blocks, intermediate 256, 8 heads / 4 KV heads, vocab 260 (bytes)",
        "pretrain": {"steps": len(pre), "batch": [batch, seqlen], "lr": 3e-3,
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None},
        "arms": {},
    }  # fmt: skip
    row_roles, col_roles = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")
    mlp_roles = (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in"))
    for arm, (r, lr, steps) in AGREEMENT_ARMS.items():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoRAPruneConfig(r=r, lora_alpha=2 * r, target_sparsity=0.5))
        blocks = [b for b in model.base_model.prune_blocks() if b.prunable]
        for b in blocks:
            for layer in b.layers.values():
                layer.get_base_layer().weight.requires_grad_(True)  # true ∂L/∂W alongside the LoRA gradients
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=lr)
        ema: dict[str, dict[int, torch.Tensor]] = {"lora": {}, "grad": {}, "magnitude": {}}
        trace = []
        model.train()
        for t, b in enumerate(tune[:steps], start=1):
            model(**b).loss.backward()
            rec = {"step": t, "rows": [], "cols": [], "cosine": [], "B_over_A": []}
            with torch.no_grad():
                for blk in blocks:
                    per_mode: dict[str, list[torch.Tensor]] = {m: [] for m in ema}
                    for role, layer in blk.layers.items():
                        W = layer.get_base_layer().weight
                        A, B, sc = (
                            layer.lora_A["default"].weight,
                            layer.lora_B["default"].weight,
                            layer.scaling["default"],
                        )
                        axis = "in" if role in col_roles else "out"
                        est = channel_scores(W, A, B, sc, grad_A=A.grad, grad_B=B.grad, axis=axis)
                        true = channel_scores(W, A, B, sc, grad_W=W.grad, axis=axis)
                        mag = channel_scores(W, A, B, sc, axis=axis)
                        rec["rows" if role in row_roles else "cols"].append(_spearman(est, true))
                        g_hat = estimate_weight_grad(A, B, A.grad, B.grad)
                        rec["cosine"].append(float(torch.nn.functional.cosine_similarity(
                            g_hat.reshape(1, -1), W.grad.float().reshape(1, -1)).squeeze()))  # fmt: skip
                        rec["B_over_A"].append(float(B.norm() / A.norm()))
                        if (role, axis) in mlp_roles:
                            for m, v in (("lora", est), ("grad", true), ("magnitude", mag)):
                                per_mode[m].append(normalize_scores(v))
                    for m, vs in per_mode.items():
                        ema[m][blk.index] = moving_average(ema[m].get(blk.index), torch.stack(vs).sum(0), 0.9)
            for blk in blocks:
                blk_grads = [layer.get_base_layer().weight for layer in blk.layers.values()]
                for W in blk_grads:
                    W.grad = None  # the base is never updated: only LoRA is in the optimizer
            opt.step()
            opt.zero_grad(set_to_none=True)

            def mean(v):
                return sum(v) / len(v)

            entry = {k: mean(rec[k]) for k in ("rows", "cols", "cosine", "B_over_A")}
            g = ema["grad"]
            for m in ("lora", "magnitude"):
                entry[f"channels_ema_{m}"] = mean([_spearman(ema[m][i], g[i]) for i in g])
                for frac in (0.2, 0.5):
                    entry[f"overlap_{int(frac * 100)}_{m}"] = mean([_bottom_overlap(ema[m][i], g[i], frac) for i in g])
            trace.append({"step": t, **entry})
        out["arms"][arm] = {"r": r, "lr": lr, "steps": steps, "trace": trace, "final": trace[-1]}
        f = trace[-1]
        print(f"[agreement] {arm}: step {steps}: rows ρ {f['rows']:.2f}, cols ρ {f['cols']:.2f}, cos {f['cosine']:.2f}, "
              f"channels(EMA) ρ lora {f['channels_ema_lora']:.2f} / magnitude {f['channels_ema_magnitude']:.2f}, "
              f"‖B‖/‖A‖ {f['B_over_A']:.3f}", flush=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------- quality


def _magnitude_masks(model, sparsity: float) -> None:
    """One-shot structured magnitude pruning with LoRAPrune's grouping: |W| per unit / channel, normalised per module."""
    from types import SimpleNamespace

    from prune_peft.callbacks.prune import LoRAPruneDriver

    (driver,) = LoRAPruneDriver.discover(model, importance="magnitude", target_sparsity=sparsity, warmup=0.0,
                                         cooldown=0.0, prune_every=1)  # fmt: skip
    state = SimpleNamespace(max_steps=1, global_step=0)
    driver.setup(model, None, state)
    driver.accumulate(model, state)  # B = 0 at init: the score is |W| alone
    driver.update(model, state)  # the single (final) event: the target at once


def run_quality(args, sparsity: float, method: str, tok, base, heldout) -> dict:
    import copy

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from prune_peft import LoRAPruneConfig, PruneCallback, compact, perplexity

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoRAPruneConfig(r=8, target_sparsity=sparsity, prune_every=2))
    callbacks = []
    if method == "loraprune":
        callbacks.append(PruneCallback())
    else:
        _magnitude_masks(model, sparsity)
    data = _windows(tok, args.seqlen, args.quality_batch * args.quality_steps)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.quality_steps, per_device_train_batch_size=args.quality_batch,
            learning_rate=5e-4, report_to=[], save_strategy="no", logging_steps=args.quality_steps,
            disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, seed=0,
        )  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate, callbacks=callbacks).train()
    seconds = time.perf_counter() - t0
    masks = model.base_model.get_masks()
    kv = sum(int((~m["units"]).sum()) for m in masks.values())
    ch = sum(int((~m["channels"]).sum()) for m in masks.values())
    small = compact(model.merge_and_unload())
    ppl = perplexity(small, tok, heldout, seqlen=512, max_windows=args.eval_windows)
    params = sum(p.numel() for p in small.parameters())
    print(f"[quality] {method:9s} {sparsity:.0%}: ppl {ppl:.2f}, {params / 1e6:.1f} M params, "
          f"{kv} KV units + {ch} channels pruned, {seconds:.0f}s", flush=True)  # fmt: skip
    return {"ppl": ppl, "params": params, "pruned_kv_units": kv, "pruned_channels": ch, "train_seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (one pair per ratio each)")
    ap.add_argument("--steps-per-run", type=int, default=3, help="Trainer steps per configuration per round")
    ap.add_argument("--quality-steps", type=int, default=24)
    ap.add_argument("--quality-batch", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke run into results/quick/")
    ap.add_argument("--skip-quality", action="store_true", help="no quality section in the results file")
    ap.add_argument("--skip-cost", action="store_true", help="no cost section in the results file")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="per-phase breakdown (forward, backward, importance, mask update, callback) into 'breakdown'",
    )
    ap.add_argument(
        "--agreement",
        action="store_true",
        help="tiny-model diagnostic: LoRA-guided vs true-gradient importance rankings over steps, into 'agreement'",
    )
    ap.add_argument("--agreement-pretrain", type=int, default=60, help="full-training steps of the tiny model first")
    ap.add_argument("--out", default=None, help="results file (default: results/loraprune.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(memory_worker(args.worker, args)))
        return 0
    if args.quick:
        args.rounds, args.steps_per_run, args.quality_steps, args.eval_windows, args.seqlen = 2, 2, 4, 2, 128
    if args.steps_per_run < 2 or args.rounds < 1:
        raise ValueError(f"--steps-per-run must be ≥ 2 (the first is untimed) and --rounds ≥ 1, got {vars(args)}")
    import torch

    torch.set_num_threads(args.threads)
    stamp = start_stamp(args.threads, args.quick)
    start = time.perf_counter()
    report: dict = {"model": "smollm2-135m"}
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    if args.profile:
        report["breakdown"] = run_profile(args)
        print(json.dumps(report["breakdown"], indent=1), flush=True)
    if args.agreement:
        report["agreement"] = run_agreement(args)
    if not args.skip_cost:
        report["cost"] = run_cost(args)
        report["cost"]["settings"] = settings
    if not args.skip_quality:
        from prune_peft.data import shakespeare_texts
        from prune_peft.evaluation import perplexity
        from prune_peft.models import load_model_and_tokenizer

        base, tok = load_model_and_tokenizer("smollm2-135m")
        heldout = shakespeare_texts("heldout")
        quality = {"dense_ppl": perplexity(base, tok, heldout, seqlen=512, max_windows=args.eval_windows)}
        print(f"[quality] dense ppl {quality['dense_ppl']:.2f}", flush=True)
        for sparsity in (0.2, 0.5):
            for method in ("loraprune", "magnitude+lora"):
                quality[f"{method}@{sparsity:.0%}"] = run_quality(args, sparsity, method, tok, base, heldout)
        quality["settings"] = settings
        report["quality"] = quality
    report["total_seconds"] = time.perf_counter() - start
    for k, v in report.get("cost", {}).get("ratios", {}).items():
        print(f"{k:48s} {v:.3f}×")
    write_results("loraprune", report, stamp, quick=args.quick, out=args.out)
    print(f"{results_path('loraprune', args.quick, args.out)} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
