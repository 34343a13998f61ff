"""One-shot pruning benchmark on the embedded SmolLM2-135M (CPU).

For Wanda (2:4) and SparseGPT (50 % unstructured) with 64 calibration sequences of 512 tokens, each in its own
process: wall time of `prune`, peak RSS during pruning as a ratio to the model's own size (goal ≤ 1.5×, showing
the block-by-block driver holds memory down), and held-out perplexity dense / 2:4 / 50 %.

    python benchmarks/oneshot.py [--nsamples 64] [--seqlen 512] [--eval-windows 32]

Writes benchmarks/results/oneshot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(method: str, nsamples: int, seqlen: int, eval_windows: int) -> dict:
    import torch

    from prune_peft import perplexity, prune
    from prune_peft.data import calibration_tokens, shakespeare_texts
    from prune_peft.models import load_model_and_tokenizer

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM  # noqa: F401  (count the runtime, not the model)

    rss_libs = _rss_mb()  # the runtime (python, torch, transformers) before any model memory
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
    rss_before = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.nsamples, args.seqlen, args.eval_windows)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = {}
    for method in ("dense", "wanda", "sparsegpt"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--nsamples",
                str(args.nsamples),
                "--seqlen",
                str(args.seqlen),
                "--eval-windows",
                str(args.eval_windows),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows[method] = json.loads(line[len("RESULT ") :])
        print(json.dumps(rows[method]), flush=True)
    dense = rows["dense"]["ppl"]
    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF → fp32)",
        "machine": f"{os.cpu_count()} CPU cores",
        "calibration": f"{args.nsamples} × {args.seqlen} tokens (Shakespeare train split)",
        "eval": f"held-out Shakespeare, {args.eval_windows} windows × 512 tokens",
        "ppl": {"dense": dense, "wanda_2:4": rows["wanda"]["ppl"], "sparsegpt_50%": rows["sparsegpt"]["ppl"]},
        "runs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "oneshot.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS / "oneshot.json")
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
