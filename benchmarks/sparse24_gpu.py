"""2:4 semi-structured speed on an NVIDIA GPU (sm80+): sparse over dense bf16, as ratios.

1. Linear layer at LLM shapes (d_in→d_out = 4096→11008, 4096→14336, 11008→4096; tokens 1024…16384), frozen 2:4
   weight: forward, and forward+backward (input gradient only, as for a frozen base under LoRA), with a row-wise
   2:4 mask (backward ∂L/∂x dense) and a transposable mask (backward sparse too). Physical limit 2×; goal ≥ 1.6×
   forward at the largest shapes.
2. One SFT step (forward + backward + AdamW step) of the embedded SmolLM2-135M, 2:4-pruned, with SparseLoRA:
   ``use_semi_structured=True`` vs ``False`` (goal ≥ 1.2×). SmolLM2-135M is small (576/1536 wide), where 2:4 is
   known to gain little (pytorch#111339); ``--model`` takes a bigger one.

    python benchmarks/sparse24_gpu.py [--quick] [--model smollm2-135m] [--batch 8] [--seqlen 512]
        [--dtypes bf16,fp16] [--shapes 4096x11008,4096x14336] [--tokens 2048,4096,8192,16384] [--config DIR]

``--config DIR`` builds the SFT model from ``DIR/config.json`` with random weights instead of loading it: the device
machine cannot take the embedded GGUF along (98 MB over its 64 MiB transfer limit), and a step's time depends on the
architecture and the 2:4 pattern, not on the weight values. ``--dry-run`` runs every code path on the CPU at toy
sizes (dense fallback, wall-clock timer) so that only GPU failures can remain for the device run.

Writes benchmarks/results/sparse24_gpu.json (``--quick``: results/quick/), stamped by ``_bench.write_results``.
Without a CUDA GPU it prints why and exits without writing anything.

Goals are judged only on the configurations they name: forward ≥ 1.6× for *every* one of the largest shapes
(4096→11008 and 4096→14336 at 16384 tokens, row-wise mask), and the SFT step ≥ 1.2× for SmolLM2-135M at
batch 8 × 512. Other configurations are reported, never counted towards a goal.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch
from _bench import start_stamp, write_results

SHAPES = [(4096, 11008), (4096, 14336), (11008, 4096)]
TOKENS = [1024, 2048, 4096, 8192, 16384]
# the configurations the goals name (docs/kernels.md)
GOAL_FWD = {"shapes": [(4096, 11008), (4096, 14336)], "tokens": 16384, "transposable": False, "min_speedup": 1.6}
GOAL_SFT = {"model": "smollm2-135m", "batch": 8, "seqlen": 512, "min_speedup": 1.2}


def goal_summary(linear: list[dict], sft: dict | None) -> dict:
    """Goal verdicts from the named configurations only; None where a named configuration was not measured."""
    named = [
        r
        for r in linear
        if (r["d_in"], r["d_out"]) in GOAL_FWD["shapes"]
        and r["tokens"] == GOAL_FWD["tokens"]
        and r["transposable"] == GOAL_FWD["transposable"]
        and r.get("dtype", "bf16") == "bf16"  # the goal is against dense bf16
    ]
    fwd_met = None
    if len(named) == len(GOAL_FWD["shapes"]):
        fwd_met = all(r["fwd_speedup"] >= GOAL_FWD["min_speedup"] for r in named)
    sft_named = sft is not None and all(sft.get(k) == GOAL_SFT[k] for k in ("model", "batch", "seqlen"))
    return {
        "goal_fwd_config": {**GOAL_FWD, "shapes": [list(s) for s in GOAL_FWD["shapes"]]},
        "goal_fwd_speedups": {f"{r['d_in']}->{r['d_out']}": r["fwd_speedup"] for r in named},
        "goal_fwd_min_speedup": min((r["fwd_speedup"] for r in named), default=None),
        "goal_fwd_1.6x_met": fwd_met,
        "max_fwd_speedup_any_config": max((r["fwd_speedup"] for r in linear), default=None),
        "goal_sft_config": GOAL_SFT,
        "sft_step_speedup": sft["step_speedup"] if sft else None,
        "goal_sft_1.2x_met": (sft["step_speedup"] >= GOAL_SFT["min_speedup"]) if sft_named else None,
    }


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _time(fn, warmup: int = 5, iters: int = 20, reps: int = 1) -> float:
    """Milliseconds per call of ``fn()``: CUDA events on a GPU, the wall clock on the CPU (dry run only).

    ``reps=1``: the median of ``iters`` single calls, each synchronised (a whole training step). ``reps>1``: the median
    over ``reps`` of the mean of ``iters`` back-to-back calls, as a layer runs inside a model, where the host queues
    the next kernel while the GPU works (a per-call host cost shows only once it exceeds the GPU time).
    """
    import time

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    calls, times = (1, iters) if reps == 1 else (iters, reps)
    per_call = []
    for _ in range(times):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            per_call.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(per_call)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_cutlass(dtype: torch.dtype) -> dict:
    """Does PyTorch's CUTLASS 2:4 GEMM run on this GPU? Runs it once and records the outcome or the error verbatim
    (the library's dispatch sends sm9x to cuSPARSELt only; this is the evidence for or against that rule)."""
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    from prune_peft.kernels import prune24

    dev = _device()
    w = prune24(torch.randn(256, 512, device=dev, dtype=dtype))[0]
    x = torch.randn(128, 512, device=dev, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sw = SparseSemiStructuredTensorCUTLASS.from_dense(w)
            y = torch.nn.functional.linear(x, sw)
        ref = torch.nn.functional.linear(x, w)
        err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
        return {"dtype": str(dtype), "runs": True, "max_rel_err": err}
    except Exception as exc:  # the point is to record whatever PyTorch raises here
        return {"dtype": str(dtype), "runs": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def bench_linear(
    d_in: int, d_out: int, tokens: int, transposable: bool, check: bool, dtype: torch.dtype = torch.bfloat16
) -> dict:
    import warnings

    from torch import nn

    from prune_peft.kernels import SemiStructuredLinear, prune24, transposable_mask24

    dev, dt = _device(), dtype
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        w = dense.weight
        w.mul_(transposable_mask24(w) if transposable else prune24(w)[1])
    sparse = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        sparse.weight.copy_(dense.weight)
    sparse = SemiStructuredLinear.from_linear(sparse)
    x = torch.randn(tokens, d_in, device=dev, dtype=dt)
    backend = sparse.semi_structured_backend(x)[0]
    if dev.type == "cpu":  # dry run: the dense fallback warns once per reason; nothing to learn from it here
        warnings.filterwarnings("ignore", message="prune_peft 2:4 semi-structured")
    xg = x.clone().requires_grad_()
    g = torch.randn(tokens, d_out, device=dev, dtype=dt)

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def run():
            xg.grad = None
            m(xg).backward(g)

        return run

    out = {
        "d_in": d_in,
        "d_out": d_out,
        "tokens": tokens,
        "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt)),
        "transposable": transposable,
        "backend": backend,
    }
    with torch.no_grad():
        out["dense_fwd_ms"] = _time(fwd(dense), iters=10, reps=5)
        out["sparse_fwd_ms"] = _time(fwd(sparse), iters=10, reps=5)
    out["dense_fwd_bwd_ms"] = _time(fwd_bwd(dense), iters=10, reps=5)
    out["sparse_fwd_bwd_ms"] = _time(fwd_bwd(sparse), iters=10, reps=5)
    if backend == "cusparselt":
        # the kernel alone, as PyTorch's semi-structured tensor calls it (default algorithm, column-major result, no
        # layer logic): the ceiling this PyTorch/cuSPARSELt build gives the layer
        compressed, xt = torch._cslt_compress(dense.weight), x.t()
        with torch.no_grad():
            out["kernel_only_fwd_ms"] = _time(lambda: torch._cslt_sparse_mm(compressed, xt), iters=10, reps=5)
        out["kernel_only_fwd_speedup"] = out["dense_fwd_ms"] / out["kernel_only_fwd_ms"]
    out["fwd_speedup"] = out["dense_fwd_ms"] / out["sparse_fwd_ms"]
    out["fwd_bwd_speedup"] = out["dense_fwd_bwd_ms"] / out["sparse_fwd_bwd_ms"]
    if check:
        with torch.no_grad():
            ref, got = dense(x).float(), sparse(x).float()
        out["max_rel_err"] = float((ref - got).abs().max() / ref.abs().max())
    return out


def bench_sft(model_name: str, batch: int, seqlen: int, steps: int, config: str | None = None) -> dict:
    import copy

    from peft import get_peft_model
    from torch import nn

    from prune_peft import SparseLoraConfig
    from prune_peft.kernels import prune24, semi_structured_status
    from prune_peft.models import load_model

    dev = _device()
    if config is not None:  # same architecture, random weights (see the module docstring)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=torch.bfloat16).to(dev)
    else:
        base = load_model(model_name, dtype=torch.bfloat16).to(dev)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(prune24(mod.weight)[1])
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), device=dev, generator=torch.Generator(dev).manual_seed(0))
    result = {
        "model": model_name,
        "weights": f"random init from {config}/config.json" if config is not None else "pretrained",
        "batch": batch,
        "seqlen": seqlen,
        "tokens_per_step": batch * seqlen,
    }
    steps_of = {}
    for label, flag in (("dense", False), ("sparse", True)):
        cfg = SparseLoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0, use_semi_structured=flag)
        model = get_peft_model(copy.deepcopy(base), cfg).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps_of[label] = step
        if flag:
            status = semi_structured_status(model, ids.new_zeros(1, dtype=torch.bfloat16))
            result["backends"] = sorted(set(status.values()))
    # interleaved pairs: dense step, sparse step, alternating order, one ratio per pair
    for fn in steps_of.values():
        _time(fn, warmup=3, iters=1)
    ratios, dense_ms, sparse_ms = [], [], []
    for i in range(steps):
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        t = {label: _time(steps_of[label], warmup=0, iters=1) for label in order}
        dense_ms.append(t["dense"])
        sparse_ms.append(t["sparse"])
        ratios.append(t["dense"] / t["sparse"])
    result["dense_step_ms"] = statistics.median(dense_ms)
    result["sparse_step_ms"] = statistics.median(sparse_ms)
    result["step_speedup"] = statistics.median(ratios)
    result["step_speedup_min_max"] = [min(ratios), max(ratios)]
    result["pairs"] = len(ratios)
    if dev.type == "cuda":
        try:
            result["profile_top_kernels"] = {label: _profile(fn) for label, fn in steps_of.items()}
        except Exception as exc:  # the breakdown is an extra; never lose the timed figures to it
            result["profile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def _profile(fn, steps: int = 2, top: int = 12) -> list[dict]:
    """The ``top`` GPU kernels by self device time over ``steps`` calls (torch.profiler), per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"name": evt.key[:120], "self_ms_per_step": us / 1e3 / steps, "calls": evt.count // steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows)
    return [{"total_self_ms_per_step": total}, *rows[:top]]


def _csv(text: str, name: str, parse, allowed: str) -> list:
    try:
        items = [parse(t) for t in text.split(",") if t.strip()]
    except (KeyError, ValueError):
        items = []
    if not items:
        raise SystemExit(f"sparse24_gpu: --{name} {text!r} is not valid; allowed: {allowed}")
    return items


def _shape(text: str) -> tuple[int, int]:
    d_in, d_out = text.lower().split("x")
    return int(d_in), int(d_out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="largest tokens only, fewer shapes")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=None, help="build the SFT model from DIR/config.json, random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--no-sft", action="store_true")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp16 for the linear grid")
    ap.add_argument("--shapes", default=None, help="comma list of DINxDOUT (default: all three LLM shapes)")
    ap.add_argument("--tokens", default=None, help="comma list of token counts (default: 1024…16384)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: exercises every code path, no figures")
    ap.add_argument("--out", default=None, help="results file (default: results/sparse24_gpu.json)")
    args = ap.parse_args(argv)
    dtypes = _csv(args.dtypes, "dtypes", lambda t: DTYPES[t.strip()], "comma list of bf16, fp16")
    shapes = _csv(args.shapes, "shapes", _shape, "comma list of DINxDOUT, e.g. 4096x11008") if args.shapes else None
    tokens = _csv(args.tokens, "tokens", int, "comma list of positive integers") if args.tokens else None
    if tokens is not None and min(tokens) <= 0:
        raise SystemExit(f"sparse24_gpu: --tokens {args.tokens!r} is not valid; allowed: positive integers")

    if args.dry_run:
        shapes, tokens = [(128, 256)], [64]
        if args.out is None:
            raise SystemExit("sparse24_gpu: --dry-run needs --out (a dry run never writes the published results)")
    elif not torch.cuda.is_available():
        print("sparse24_gpu: SKIPPED — no CUDA GPU visible; 2:4 sparse tensor cores need an NVIDIA sm80+ GPU.")
        print("Nothing measured, nothing written. docs/kernels.md keeps these figures as 'not yet measured'.")
        return 0
    cuda = torch.cuda.is_available()
    cap = torch.cuda.get_device_capability() if cuda else None
    if cap is not None and cap < (8, 0):
        print(f"sparse24_gpu: SKIPPED — GPU sm{cap[0]}{cap[1]} has no 2:4 sparse tensor cores (needs sm80+).")
        return 0

    stamp = start_stamp(torch.get_num_threads(), args.quick or args.dry_run)
    env = {
        "gpu": torch.cuda.get_device_name() if cuda else "none (dry run on CPU)",
        "capability": f"sm{cap[0]}{cap[1]}" if cap else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": bool(torch.backends.cusparselt.is_available()),
        "cusparselt_version": torch.backends.cusparselt.version()
        if torch.backends.cusparselt.is_available()
        else None,
        "python": platform.python_version(),
        "dry_run": bool(args.dry_run),
    }
    print(json.dumps(env, indent=1), flush=True)
    tokens = tokens or ([16384] if args.quick else TOKENS)
    shapes = shapes or (SHAPES[:2] if args.quick else SHAPES)
    cutlass = [probe_cutlass(dt) for dt in dtypes] if cuda else []
    for c in cutlass:
        print(f"CUTLASS 2:4 probe {c['dtype']}: {'runs' if c['runs'] else 'fails: ' + c['error']}", flush=True)
    linear = []
    print(
        f"{'shape':>14} {'tokens':>6} {'dt':>4} {'T':>2} {'backend':>10} {'fwd ×':>6} {'fwd+bwd ×':>9} {'kernel ×':>8}"
    )
    for dt in dtypes:
        for d_in, d_out in shapes:
            for n in tokens:
                for transposable in (False, True):
                    try:
                        r = bench_linear(d_in, d_out, n, transposable, check=n == tokens[0], dtype=dt)
                    except Exception as exc:  # one failing configuration must not lose the others' figures
                        r = {"d_in": d_in, "d_out": d_out, "tokens": n, "transposable": transposable}
                        r["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                        print(f"{d_in:>6}→{d_out:<7} {n:>6} FAILED {r['error']}", flush=True)
                        linear.append(r)
                        continue
                    linear.append(r)
                    print(
                        f"{d_in:>6}→{d_out:<7} {n:>6} {r['dtype']:>4} {'T' if transposable else '-':>2} "
                        f"{r['backend']:>10} {r['fwd_speedup']:6.2f} {r['fwd_bwd_speedup']:9.2f} "
                        f"{r.get('kernel_only_fwd_speedup', float('nan')):8.2f}",
                        flush=True,
                    )
    sft, sft_error = None, None
    if not args.no_sft:
        config = args.config
        if args.dry_run and config is None:
            raise SystemExit("sparse24_gpu: --dry-run needs --config DIR (or --no-sft)")
        batch, seqlen = (2, 32) if args.dry_run else (args.batch, args.seqlen)
        try:
            sft = bench_sft(args.model, batch, seqlen, 2 if args.dry_run else args.sft_steps, config=config)
            print(f"SFT step ({args.model}, {sft['tokens_per_step']} tokens): sparse/dense speedup "
                  f"{sft['step_speedup']:.2f}×", flush=True)  # fmt: skip
        except Exception as exc:
            import traceback

            traceback.print_exc()
            sft_error = f"{type(exc).__name__}: {str(exc)[:400]}"
    summary = goal_summary([r for r in linear if "error" not in r], sft)
    print(json.dumps(summary, indent=1))
    payload = {"env": env, "cutlass_probe": cutlass, "linear": linear, "sft": sft, "summary": summary}
    if sft_error is not None:
        payload["sft_error"] = sft_error
    write_results("sparse24_gpu", payload, stamp, quick=args.quick or args.dry_run, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
