"""Self-data distillation benchmark on the embedded SmolLM2-135M (CPU-sized; one run, ratios within the run).

1. Generation throughput: batched, length-bucketed ``generate`` with the template's shared prefix prefilled once
   and its KV cache reused by every batch (what ``self_distill`` runs) vs a per-sample ``generate`` loop (no shared
   cache) on the same math rewrite prompts, greedy, same ``max_new_tokens``. Goal ≥ 5× with identical outputs.
   Prefill (one new token) and decode (the rest) are timed separately; batching without the prefix cache is
   reported as the alternative.
2. Quality: 4 of 30 blocks dropped by angular distance, then equal LoRA fine-tuning steps on self-distilled vs
   original arithmetic data: held-out answer accuracy and held-out Shakespeare perplexity
   (``examples/self_distill_recovery.py``).

    python benchmarks/distill.py                 # ≈ 10 minutes on 2 shared CPU cores
    python benchmarks/distill.py --quick         # tiny random model, smoke test

Writes benchmarks/results/distill.json (``--quick``: results/quick/), stamped by ``_bench.write_results``. The
speedup is the median (and spread) over ``--repeats`` groups (loop half, batched runs, loop half), each one pair.
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

    def loop(part, tokens=max_new_tokens):  # the plain per-sample loop: one generate per prompt, no shared cache
        kw = {"max_new_tokens": tokens, "min_new_tokens": 1 if tokens == 1 else 0}
        return lambda: generate_texts(model, tok, part, batch_size=1, prefix_cache=False, **kw)

    def batched(prefix_cache=True, tokens=max_new_tokens, timings=None):
        kw = {"max_new_tokens": tokens, "min_new_tokens": 1 if tokens == 1 else 0}
        return lambda: generate_texts(
            model, tok, ids, batch_size=batch_size, prefix_cache=prefix_cache, timings=timings, **kw
        )

    # Per-sample loop in two halves around the batched runs, so a change in machine load hits both sides; each
    # such group is one pair (loop time / batched time), repeated. Prefill is timed alone (one new token, the same
    # prompts and batches), decode is the rest of the full run.
    wall, cpu, wall_np, pre, dec, pre_cpu, dec_cpu, identical = [], [], [], [], [], [], [], []
    shared = {}
    for _ in range(repeats):
        loop_a, wa, ca = _timed(loop(ids[:half]))
        out_b, tb, cb = _timed(batched(timings=shared))
        _, tnp, _ = _timed(batched(prefix_cache=False))
        _, pb, pbc = _timed(batched(tokens=1))
        loop_b, wb, cb2 = _timed(loop(ids[half:]))
        _, pl, plc = _timed(loop(ids, tokens=1))
        t_loop, c_loop = wa + wb, ca + cb2
        wall.append(t_loop / tb)
        cpu.append(c_loop / cb)
        wall_np.append(t_loop / tnp)
        pre.append(pl / pb)
        dec.append(max(t_loop - pl, 1e-9) / max(tb - pb, 1e-9))
        pre_cpu.append(plc / pbc)
        # both sides decode the same greedy tokens, so the ratio of decode totals is the ratio per decode step
        dec_cpu.append(max(c_loop - plc, 1e-9) / max(cb - pbc, 1e-9))
        identical.append(sum(a == b for a, b in zip(loop_a + loop_b, out_b)) / n)
    from prune_peft.distill.generation import common_prefix

    return {
        "prompts": n,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "mean_prompt_tokens": round(sum(map(len, ids)) / n, 1),
        "shared_prefix_tokens": len(common_prefix(ids)),
        "per_sample_loop_s": round(t_loop, 2),
        "batched_s": round(tb, 2),
        "batched_no_prefix_cache_s": round(tnp, 2),
        "per_sample_rows_per_s": round(n / t_loop, 3),
        "batched_rows_per_s": round(n / tb, 3),
        "loop_prefill_s": round(pl, 3),
        "batched_prefill_s": round(pb, 3),
        "batched_shared_prefix_prefill_s": round(shared.get("prefix_prefill", 0.0) / repeats, 4),
        "loop_decode_s": round(t_loop - pl, 3),
        "batched_decode_s": round(tb - pb, 3),
        "speedup_wall": round(paired(wall, "x", "y")["median"], 2),
        "speedup_cpu_time": round(paired(cpu, "x", "y")["median"], 2),
        "speedup_wall_pairs": paired(wall, "per-sample loop wall time", "batched (prefix-cached) wall time"),
        "speedup_cpu_pairs": paired(cpu, "per-sample loop CPU time", "batched (prefix-cached) CPU time"),
        "speedup_wall_no_prefix_cache_pairs": paired(
            wall_np, "per-sample loop wall time", "batched without prefix cache wall time"
        ),
        "prefill_speedup_pairs": paired(pre, "per-sample loop prefill wall time", "batched prefill wall time"),
        "decode_speedup_pairs": paired(dec, "per-sample loop decode wall time", "batched decode wall time"),
        "prefill_speedup": round(paired(pre, "x", "y")["median"], 2),
        "decode_speedup": round(paired(dec, "x", "y")["median"], 2),
        "prefill_speedup_cpu_time": round(paired(pre_cpu, "x", "y")["median"], 2),
        "decode_step_speedup_cpu_time": round(paired(dec_cpu, "x", "y")["median"], 2),
        "identical_outputs": min(identical),
        "goal": "speedup_wall >= 5 with identical_outputs == 1.0",
        "goal_met": paired(wall, "x", "y")["median"] >= 5 and min(identical) == 1.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random model; checks the script, not the numbers")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared, loaded CPU)")
    p.add_argument("--tp-prompts", type=int, default=24)
    p.add_argument("--tp-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3, help="loop/batched/loop groups (pairs) for the speedup")
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
        f"vs {tp['per_sample_rows_per_s']} rows/s), {tp['speedup_cpu_time']}x in CPU time; prefill "
        f"{tp['prefill_speedup']}x, decode {tp['decode_speedup']}x; identical outputs {tp['identical_outputs']:.2f}"
    )
    for name in ("teacher", "pruned", "sft_original", "sft_distilled"):
        print(f"{name:14s} accuracy {q[name]['accuracy']:.3f}  ppl {q[name].get('ppl')}")
    print(f"acceptance {q['distill_stats']['acceptance_rate']:.3f}; total {result['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
