"""LoRAPrune benchmark on SmolLM2-135M: cost vs plain LoRA and vs full-weight-gradient importance; quality.

Cost (batch ``--batch`` × ``--seqlen``, default 4 × 256, transformers.Trainer, LoRA r=8 on q/k/v/o/gate/up/down,
AdamW over the LoRA parameters only; every configuration in its own subprocess of this run):

- ``lora``         plain peft LoRA;
- ``loraprune``    LoRAPrune + PruneCallback: importance from LoRA weights and gradients at every step, pruning
                   events inside the measured window;
- ``grad``         the same with importance from the *true* base-weight gradients (LLM-Pruner style: the base weights
                   of the adapted layers require grad; the optimizer still only updates LoRA).

Time: median wall and process-CPU time per step after ``--warmup-steps`` (goal: LoRAPrune ≤ 1.10× LoRA).
Memory: separate runs with glibc's mmap threshold pinned to 64 KiB, so freed tensors leave the process and the peak
RSS tracks peak live memory; reported as peak RSS and as "training memory" (peak RSS minus the RSS with the model
loaded), at the benchmark shape and at 1 × 128, where weights rather than activations dominate (goals: LoRAPrune
≤ 1.05× LoRA; ≤ 0.6× the full-gradient baseline — the paper reports −52.6 % on LLaMA-7B).

Quality (``--quality-steps`` optimizer steps of batch ``--quality-batch`` × ``--seqlen`` on Shakespeare, then held-out
perplexity of the compacted model) at 20 % and 50 % structured sparsity (GQA units + MLP channels, first 10 % and last
block kept): LoRAPrune vs one-shot structured magnitude pruning (|W| per unit/channel, same grouping and
normalisation) followed by LoRA with the same steps.

    python benchmarks/loraprune.py                  # ≈ 10 min on 2 busy CPU cores
    python benchmarks/loraprune.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


def cost_worker(config: str, args) -> dict:
    """One configuration, in a fresh process: step times and peak memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from prune_peft import LoRAPruneConfig, PruneCallback
    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("smollm2-135m")
    steps = args.warmup_steps + args.timed_steps
    data = _windows(tok, args.seqlen, args.batch * steps)
    callbacks: list = []
    if config == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=_targets()))
    else:
        importance = "grad" if config == "grad" else "lora"
        cfg = LoRAPruneConfig(r=8, target_sparsity=0.5, importance=importance, prune_every=2, warmup=0.0)
        model = get_peft_model(model, cfg)
        if config == "grad":  # LLM-Pruner style: the base weights of the adapted layers get gradients
            for name, p in model.named_parameters():
                if "base_layer.weight" in name:
                    p.requires_grad_(True)
        callbacks.append(PruneCallback())
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora_params, lr=2e-4)  # same optimizer state in every configuration

    times: list[float] = []
    cpu_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    base_rss = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch, report_to=[],
            save_strategy="no", logging_steps=steps, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        )  # fmt: skip
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate,
                          callbacks=[*callbacks, Clock()], optimizers=(optimizer, None))  # fmt: skip
        trainer.train()
    timed = times[args.warmup_steps :]
    result = {
        "config": config,
        "step_seconds_median": statistics.median(timed),
        "step_seconds": timed,
        "step_cpu_seconds_median": statistics.median(cpu_times[args.warmup_steps :]),
        "peak_rss_mb": _peak_rss_mb(),
        "model_rss_mb": base_rss,
        "training_mb": _peak_rss_mb() - base_rss,
    }
    if config != "lora":
        logged = [h for h in trainer.state.log_history if "prune/pruned_channels" in h]
        result["pruned_channels"] = logged[-1]["prune/pruned_channels"] if logged else None
    return result


def _worker(config: str, batch: int, seqlen: int, warmup: int, timed: int, threads: int, exact_memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--batch", str(batch), "--seqlen", str(seqlen),
           "--warmup-steps", str(warmup), "--timed-steps", str(timed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if exact_memory:
        # blocks ≥ 64 KiB come from mmap and go back to the OS when freed, so the peak RSS is the peak of live
        # memory rather than of glibc's arenas (page faults make these runs slower: no timings from them)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{config} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIGS = ("lora", "loraprune", "grad")


def run_cost(args) -> dict:
    """Timing runs (default allocator), then memory runs (mmap allocator) at the benchmark shape and at 1 × 128."""
    results: dict = {"time": {}, "memory": {}}
    for config in CONFIGS:
        r = _worker(config, args.batch, args.seqlen, args.warmup_steps, args.timed_steps, args.threads, False)
        results["time"][config] = r
        print(f"[time] {config:10s} step {r['step_seconds_median']:.2f}s (CPU {r['step_cpu_seconds_median']:.2f}s)",
              flush=True)  # fmt: skip
    shapes = [(args.batch, args.seqlen), (1, 128)]
    for batch, seqlen in shapes:
        key = f"{batch}x{seqlen}"
        results["memory"][key] = {}
        for config in CONFIGS:
            r = _worker(config, batch, seqlen, 1, 1, args.threads, True)
            results["memory"][key][config] = {k: r[k] for k in ("peak_rss_mb", "model_rss_mb", "training_mb")}
            print(f"[memory {key}] {config:10s} peak RSS {r['peak_rss_mb']:.0f} MB (training {r['training_mb']:.0f} MB)",
                  flush=True)  # fmt: skip
    t = results["time"]
    ratios = {
        "loraprune_vs_lora_time": t["loraprune"]["step_seconds_median"] / t["lora"]["step_seconds_median"],
        "loraprune_vs_lora_cpu_time": t["loraprune"]["step_cpu_seconds_median"] / t["lora"]["step_cpu_seconds_median"],
        "loraprune_vs_grad_time": t["loraprune"]["step_seconds_median"] / t["grad"]["step_seconds_median"],
    }
    for key, m in results["memory"].items():
        for other in ("lora", "grad"):
            ratios[f"loraprune_vs_{other}_peak_rss@{key}"] = m["loraprune"]["peak_rss_mb"] / m[other]["peak_rss_mb"]
            ratios[f"loraprune_vs_{other}_training_memory@{key}"] = (
                m["loraprune"]["training_mb"] / m[other]["training_mb"]
            )
    results["ratios"] = ratios
    return results


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
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=5)
    ap.add_argument("--quality-steps", type=int, default=24)
    ap.add_argument("--quality-batch", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-cost", action="store_true", help="keep the cost section of an existing results file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(cost_worker(args.worker, args)))
        return 0
    if args.quick:
        args.timed_steps, args.quality_steps, args.eval_windows, args.seqlen = 2, 4, 2, 128
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name = "loraprune_quick.json" if args.quick else "loraprune.json"
    previous = json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else {}
    report = {
        "model": "smollm2-135m",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    if not args.skip_cost:
        report["cost"] = run_cost(args)
        report["cost"]["settings"] = settings
    elif "cost" in previous:
        report["cost"] = previous["cost"]
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
    elif "quality" in previous:
        report["quality"] = previous["quality"]
    report["total_seconds"] = time.perf_counter() - start
    r = report.get("cost", {}).get("ratios")
    if r:
        for k, v in r.items():
            print(f"{k:48s} {v:.3f}×")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / name} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
