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
    python benchmarks/distill.py --profile --tp-prompts 8 --tp-tokens 16   # op shares per phase, writes nothing

Writes benchmarks/results/distill.json (``--quick``: results/quick/), stamped by ``_bench.write_results``. The
speedup is the median (and spread) over ``--repeats`` groups (loop half, batched runs, loop half), each one pair;
the ``*_s`` seconds are medians over the groups. ``work`` counts what each path computed (model forwards, prefill
tokens, decode rows × steps): machine-independent, unlike the seconds. ``--profile`` prints torch.profiler's
self-CPU op shares per phase (prefill, decode, outside the model) for both paths and writes no results.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import importlib.util
import json
import os
import statistics
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


@contextlib.contextmanager
def count_work(model):
    """Counts of what the model computed inside the block: forwards, prefill tokens (forwards of several tokens)
    and decode row-steps (one-token forwards, one per row), read from ``model.forward``'s inputs by a hook."""
    work = collections.Counter()

    def pre(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is not None:
            rows, width = x.shape
            work["forwards"] += 1
            work["decode_row_steps" if width == 1 else "prefill_tokens"] += rows * width

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield work
    finally:
        handle.remove()


def _prompt_ids(tok, n: int) -> list[list[int]]:
    ds = arithmetic_problems(n, seed=1)
    chat = bool(tok.chat_template)
    prompts = [build_prompt(tok, TEMPLATES["math"], q, a, chat) for q, a in zip(ds["prompt"], ds["completion"])]
    return [tok(p, add_special_tokens=not chat)["input_ids"] for p in prompts]


def profile(model, tok, n: int, batch_size: int, max_new_tokens: int, top: int = 8) -> dict:
    """Self-CPU time of each op per phase (prefill: forwards of several tokens, decode: one-token forwards,
    outside: generate's own work between forwards) for the per-sample loop and the batched path."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    ids = _prompt_ids(tok, n)
    generate_texts(model, tok, ids[:2], batch_size=2, max_new_tokens=2)  # warm-up
    kw = {"max_new_tokens": max_new_tokens, "min_new_tokens": 0}
    runs = {
        "per_sample_loop": lambda: generate_texts(model, tok, ids, batch_size=1, prefix_cache=False, **kw),
        "batched": lambda: generate_texts(model, tok, ids, batch_size=batch_size, **kw),
    }
    ranges: list = []

    def pre(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        ranges.append(record_function("decode" if x.shape[1] == 1 else "prefill"))
        ranges[-1].__enter__()

    def post(module, args, kwargs, out):
        ranges.pop().__exit__(None, None, None)

    hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    report = {}
    try:
        for name, fn in runs.items():
            with count_work(model) as work, torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                cpu = time.process_time()
                fn()
                cpu = time.process_time() - cpu
            events = list(prof.events())
            spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES)
            starts = [a for a, _, _ in spans]
            per_phase: dict[str, collections.Counter] = {ph: collections.Counter() for ph in (*PHASES, "outside")}
            for e in events:
                if e.name in PHASES:
                    continue
                i = bisect.bisect_right(starts, e.time_range.start) - 1
                phase = spans[i][2] if i >= 0 and e.time_range.start < spans[i][1] else "outside"
                per_phase[phase][e.name] += e.self_cpu_time_total
            total = sum(sum(c.values()) for c in per_phase.values()) or 1
            report[name] = {"cpu_s": round(cpu, 2), "work": dict(work)}
            for phase, ops in per_phase.items():
                t = sum(ops.values())
                report[name][phase] = {
                    "share_of_run": round(t / total, 3),
                    "top_ops": {op: round(v / (t or 1), 3) for op, v in ops.most_common(top)},
                }
    finally:
        for h in hooks:
            h.remove()
    return report


PHASES = ("prefill", "decode")


def throughput(model, tok, n: int, batch_size: int, max_new_tokens: int, repeats: int = 1) -> dict:
    ids = _prompt_ids(tok, n)
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
    wall, cpu, wall_np, cpu_np, pre, dec, pre_cpu, dec_cpu, identical = ([] for _ in range(9))
    secs = collections.defaultdict(list)  # per group: seconds of each run, reported as medians
    shared = {}
    for _ in range(repeats):
        with count_work(model) as work_loop:
            loop_a, wa, ca = _timed(loop(ids[:half]))
        with count_work(model) as work_batched:
            out_b, tb, cb = _timed(batched(timings=shared))
        with count_work(model) as work_np:
            _, tnp, cnp = _timed(batched(prefix_cache=False))
        _, pb, pbc = _timed(batched(tokens=1))
        with count_work(model) as work_loop_b:
            loop_b, wb, cb2 = _timed(loop(ids[half:]))
        _, pl, plc = _timed(loop(ids, tokens=1))
        work_loop.update(work_loop_b)
        t_loop, c_loop = wa + wb, ca + cb2
        wall.append(t_loop / tb)
        cpu.append(c_loop / cb)
        wall_np.append(t_loop / tnp)
        cpu_np.append(c_loop / cnp)
        pre.append(pl / pb)
        dec.append(max(t_loop - pl, 1e-9) / max(tb - pb, 1e-9))
        pre_cpu.append(plc / pbc)
        # both sides produce the same greedy tokens, so this is the decode cost per produced token (the loop stops a
        # row at its end-of-sequence token; the batched path drops finished rows between its generate calls)
        dec_cpu.append(max(c_loop - plc, 1e-9) / max(cb - pbc, 1e-9))
        identical.append(sum(a == b for a, b in zip(loop_a + loop_b, out_b)) / n)
        for key, value in {"loop": t_loop, "batched": tb, "np": tnp, "pl": pl, "pb": pb, "c_loop": c_loop}.items():
            secs[key].append(value)
        secs["c_batched"].append(cb)
        secs["c_np"].append(cnp)
    med = {k: statistics.median(v) for k, v in secs.items()}
    t_loop, tb, tnp, pl, pb = med["loop"], med["batched"], med["np"], med["pl"], med["pb"]
    from prune_peft.distill.generation import DECODE_CHUNK, common_prefix

    return {
        "prompts": n,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "mean_prompt_tokens": round(sum(map(len, ids)) / n, 1),
        "shared_prefix_tokens": len(common_prefix(ids)),
        "per_sample_loop_s": round(t_loop, 2),
        "batched_s": round(tb, 2),
        "batched_no_prefix_cache_s": round(tnp, 2),
        "per_sample_loop_cpu_s": round(med["c_loop"], 2),
        "batched_cpu_s": round(med["c_batched"], 2),
        "batched_no_prefix_cache_cpu_s": round(med["c_np"], 2),
        "decode_chunk_tokens": DECODE_CHUNK,
        "work": {
            "per_sample_loop": dict(work_loop),
            "batched": dict(work_batched),
            "batched_no_prefix_cache": dict(work_np),
        },
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
        "speedup_cpu_no_prefix_cache_pairs": paired(
            cpu_np, "per-sample loop CPU time", "batched without prefix cache CPU time"
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
    p.add_argument("--profile", action="store_true", help="print op shares per phase (torch.profiler); no results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.profile and args.out:
        raise ValueError("--profile writes no results file; drop --out")
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
    if args.profile:
        print(json.dumps(profile(model, tok, args.tp_prompts, args.tp_prompts, args.tp_tokens), indent=2))
        return 0
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
