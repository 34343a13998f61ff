"""Self-data distillation benchmark on the embedded SmolLM2-135M (CPU-sized; one run, ratios within the run).

1. Generation throughput: batched, length-bucketed, left-padded ``generate`` (what ``self_distill`` runs) vs a
   per-sample ``generate`` loop on the same math rewrite prompts, greedy, same ``max_new_tokens``. Goal ≥ 5×.
2. Quality: 4 of 30 blocks dropped by angular distance, then equal LoRA fine-tuning steps on self-distilled vs
   original arithmetic data: held-out answer accuracy and held-out Shakespeare perplexity
   (``examples/self_distill_recovery.py``).

    python benchmarks/distill.py                 # ≈ 10 minutes on 2 shared CPU cores
    python benchmarks/distill.py --quick         # tiny random model, smoke test

Writes benchmarks/results/distill.json (``--quick``: results/quick/), stamped by ``_bench.write_results``. The
speedup is the median (and spread) over ``--repeats`` loop/batched/loop triples, each one pair.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from _bench import paired, start_stamp, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from prune_peft.distill import TEMPLATES, build_prompt, generate_texts
from prune_peft.sft_data import arithmetic_problems

ROOT = Path(__file__).resolve().parents[1]


def _example_module():
    spec = importlib.util.spec_from_file_location(
        "self_distill_recovery", ROOT / "examples" / "self_distill_recovery.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is robust to other jobs on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def throughput(model, tok, n: int, batch_size: int, max_new_tokens: int, repeats: int = 1) -> dict:
    ds = arithmetic_problems(n, seed=1)
    chat = bool(tok.chat_template)
    prompts = [build_prompt(tok, TEMPLATES["math"], q, a, chat) for q, a in zip(ds["prompt"], ds["completion"])]
    ids = [tok(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
    generate_texts(model, tok, ids[:2], batch_size=2, max_new_tokens=2)  # warm-up (allocations, kernels)
    half = n // 2

    def loop(part):
        return lambda: generate_texts(model, tok, part, batch_size=1, max_new_tokens=max_new_tokens)

    # per-sample loop in two halves around the batched run, so a change in machine load hits both sides; each such
    # triple is one pair (loop time / batched time), repeated
    wall_pairs, cpu_pairs, identical = [], [], []
    for _ in range(repeats):
        loop_a, wa, ca = _timed(loop(ids[:half]))
        batched, t_batched, c_batched = _timed(
            lambda: generate_texts(model, tok, ids, batch_size=batch_size, max_new_tokens=max_new_tokens)
        )
        loop_b, wb, cb = _timed(loop(ids[half:]))
        t_loop, c_loop = wa + wb, ca + cb
        wall_pairs.append(t_loop / t_batched)
        cpu_pairs.append(c_loop / c_batched)
        identical.append(sum(a == b for a, b in zip(loop_a + loop_b, batched)) / n)
    # where the time goes: prefill is compute-bound on a CPU (batching barely helps), decode steps are not
    from prune_peft.distill.generation import TransformersBackend

    parts = {}
    for bs in (1, batch_size):
        cpu = []
        for steps in (1, 9):
            kw = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
            cpu.append(_timed(lambda kw=kw, bs=bs: TransformersBackend(model, tok, kw).generate(ids[:bs], 0))[2])
        parts[bs] = {"prefill": cpu[0] / bs, "decode_step": (cpu[1] - cpu[0]) / 8 / bs}
    return {
        "prompts": n,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "mean_prompt_tokens": round(sum(map(len, ids)) / n, 1),
        "per_sample_loop_s": round(t_loop, 2),
        "batched_s": round(t_batched, 2),
        "per_sample_rows_per_s": round(n / t_loop, 3),
        "batched_rows_per_s": round(n / t_batched, 3),
        "speedup_wall": round(paired(wall_pairs, "x", "y")["median"], 2),
        "speedup_cpu_time": round(paired(cpu_pairs, "x", "y")["median"], 2),
        "speedup_wall_pairs": paired(wall_pairs, "per-sample loop wall time", "batched wall time"),
        "speedup_cpu_pairs": paired(cpu_pairs, "per-sample loop CPU time", "batched CPU time"),
        "prefill_speedup_cpu_time": round(parts[1]["prefill"] / parts[batch_size]["prefill"], 2),
        "decode_step_speedup_cpu_time": round(parts[1]["decode_step"] / parts[batch_size]["decode_step"], 2),
        "identical_outputs": min(identical),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random model; checks the script, not the numbers")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared, loaded CPU)")
    p.add_argument("--tp-prompts", type=int, default=24)
    p.add_argument("--tp-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3, help="loop/batched/loop triples (pairs) for the speedup")
    p.add_argument("--out", default=None, help="results file (default: results/distill.json)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    stamp = start_stamp(args.threads, args.quick)
    started = time.perf_counter()
    example = _example_module()
    import tempfile

    # a fresh run folder: a distill cache left by an earlier run would skip generation and its timing
    ex_argv = ["--out", tempfile.mkdtemp(prefix="distill_bench_")]
    if args.quick:
        from prune_peft.testing import byte_tokenizer, tiny_causal_lm

        model, tok = tiny_causal_lm("llama", max_position_embeddings=1024), byte_tokenizer()
        ex_argv.append("--quick")
        args.tp_prompts, args.tp_tokens = 8, 8
    else:
        from prune_peft.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer("smollm2-135m")
    tp = throughput(model, tok, args.tp_prompts, args.tp_prompts, args.tp_tokens, args.repeats)
    print(json.dumps({"throughput": tp}, indent=2), flush=True)
    del model
    quality = example.run(example.parse_args(ex_argv))
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": "toy (quick)" if args.quick else "smollm2-135m",
        "throughput": tp,
        "quality": {k: quality[k] for k in ("config", "layer_drop", "distill_stats", "timings_s") if k in quality},
        "seconds": None,
    }
    for name in ("teacher", "pruned", "sft_original", "sft_distilled"):
        r = quality[name]
        result["quality"][name] = {
            k: r.get(k) for k in ("accuracy", "correct", "n", "ppl", "accuracy_retention", "train_losses", "sample")
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = write_results("distill", result, stamp, quick=args.quick, out=args.out)
    q = result["quality"]
    print(
        f"throughput: batched {tp['speedup_wall']}x the per-sample loop in wall time ({tp['batched_rows_per_s']} "
        f"vs {tp['per_sample_rows_per_s']} rows/s), {tp['speedup_cpu_time']}x in CPU time"
    )
    for name in ("teacher", "pruned", "sft_original", "sft_distilled"):
        print(f"{name:14s} accuracy {q[name]['accuracy']:.3f}  ppl {q[name].get('ppl')}")
    print(f"acceptance {q['distill_stats']['acceptance_rate']:.3f}; total {result['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
