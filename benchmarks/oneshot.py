"""One-shot pruning benchmark on the embedded SmolLM2-135M (CPU).

For Wanda (2:4) and SparseGPT (50 % unstructured) with 64 calibration sequences of 512 tokens, each in its own
process: wall time of `prune`, peak RSS during pruning as a ratio to the model's own size (goal ≤ 1.5×, showing
the block-by-block driver holds memory down), and held-out perplexity dense / 2:4 / 50 %.

    python benchmarks/oneshot.py [--nsamples 64] [--seqlen 512] [--eval-windows 32]

Writes benchmarks/results/oneshot.json (``--quick``: a smoke run into benchmarks/results/quick/), stamped by
``_bench.write_results``; memory is measured the one way ``_bench.MEMORY_METHOD`` describes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _bench import MEMORY_METHOD, memory_record, peak_rss_mb, rss_mb, run_memory_worker, start_stamp, write_results


def worker(method: str, nsamples: int, seqlen: int, eval_windows: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)

    from prune_peft import perplexity, prune
    from prune_peft.data import calibration_tokens, shakespeare_texts
    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM  # noqa: F401  (count the runtime, not the model)

    rss_libs = rss_mb()  # the runtime (python, torch, transformers) before any model memory
    model, tok = load_model_and_tokenizer("smollm2-135m")
    with torch.no_grad():  # page in mmapped weights so they count before pruning starts
        for p in model.parameters():
            p.add_(0)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    calib = calibration_tokens(shakespeare_texts("train"), tok, nsamples=nsamples, seqlen=seqlen, seed=0)
    held = shakespeare_texts("heldout")
    out = {"method": method, "model_mb": model_mb, "calibration": [nsamples, seqlen]}
    if method == "dense":
        out["ppl"] = perplexity(model, tok, held, seqlen=512, max_windows=eval_windows)
        return out
    rss_before = rss_mb()
    peak_before = peak_rss_mb()
    kwargs = {"pattern": "2:4"} if method == "wanda" else {"sparsity": 0.5}
    t0 = time.perf_counter()
    report = prune(
        model,
        method=method,
        calibration=calib,
        tokenizer=tok,
        nsamples=nsamples,
        seqlen=seqlen,
        progress=False,
        **kwargs,
    )
    seconds = time.perf_counter() - t0
    memory = memory_record(rss_before)
    peak = memory["peak_rss_mb"]
    out.update(
        memory=memory,
        pattern=report.pattern,
        sparsity=report.sparsity,
        nm_valid=report.nm_valid,
        prune_seconds=seconds,
        rss_runtime_mb=rss_libs,
        rss_before_prune_mb=rss_before,
        peak_rss_mb=peak,
        peak_before_prune_mb=peak_before,
        peak_rss_over_model=(peak - rss_libs) / model_mb,
        extra_rss_over_model=(peak - rss_before) / model_mb,
        ppl=perplexity(model, tok, held, seqlen=512, max_windows=eval_windows),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="8 × 128 calibration, 2 eval windows; results/quick/")
    ap.add_argument("--out", default=None, help="results file (default: results/oneshot.json)")
    ap.add_argument("--worker", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(args.worker, args.nsamples, args.seqlen, args.eval_windows, args.threads)
        print(json.dumps(out))
        return
    if args.quick:
        args.nsamples, args.seqlen, args.eval_windows = 8, 128, 2
    stamp = start_stamp(args.threads, args.quick)
    rows = {}
    for method in ("dense", "wanda", "sparsegpt"):
        # each method in its own fresh process under the shared memory method (its peak RSS is its own)
        cmd = [__file__, "--worker", method, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        cmd += ["--eval-windows", str(args.eval_windows), "--threads", str(args.threads)]
        rows[method] = run_memory_worker(cmd, args.threads)
        print(json.dumps(rows[method]), flush=True)
    dense = rows["dense"]["ppl"]
    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF → fp32)",
        "calibration": f"{args.nsamples} × {args.seqlen} tokens (Shakespeare train split)",
        "eval": f"held-out Shakespeare, {args.eval_windows} windows × 512 tokens",
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "memory_method": MEMORY_METHOD,
        "ratios": {
            "peak_rss_over_model": "(peak RSS while pruning − RSS of the runtime before the model was loaded) / "
            "model parameter bytes",
            "extra_rss_over_model": "(peak RSS while pruning − RSS with the model loaded) / model parameter bytes",
        },
        "timing_note": "prune_seconds is measured in the memory process (mmap-pinned allocator, slower than default)",
        "ppl": {"dense": dense, "wanda_2:4": rows["wanda"]["ppl"], "sparsegpt_50%": rows["sparsegpt"]["ppl"]},
        "runs": rows,
    }
    write_results("oneshot", result, stamp, quick=args.quick, out=args.out)
    print(
        "\n| method | pattern | time (s) | (peak RSS − runtime) / model size | extra RSS while pruning / model | ppl |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| dense | – | – | – | – | {dense:.2f} |")
    for m in ("wanda", "sparsegpt"):
        r = rows[m]
        print(
            f"| {m} | {r['pattern']} | {r['prune_seconds']:.0f} | {r['peak_rss_over_model']:.2f}× | "
            f"{r['extra_rss_over_model']:.2f}× | {r['ppl']:.2f} |"
        )


if __name__ == "__main__":
    main()
