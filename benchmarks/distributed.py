"""Peak memory per rank of LoRAPrune and SparseLoRA on SmolLM2-135M sharded with FSDP2 (``fully_shard``), CPU, gloo.

Layouts per method, each in fresh processes (``_bench.MEMORY_ENV``: freed memory leaves the process):

- ``single``   one process, no sharding (the reference);
- ``fsdp2x2``  two ranks under ``torchrun``, ``fully_shard`` per decoder block and at the root, each rank on its half
               of the global batch;
- ``fsdp2x1``  (``--with-one-rank``) one rank under ``torchrun``, ``fully_shard`` on a mesh of 1 (FSDP2's own
               overhead).

Every process loads the fp32 model, adds the adapter (``get_peft_model``: LoRAPrune r=8, 50 % structured target with
pruning every step; SparseLoRA r=8 on every linear of a 50 %-magnitude-pruned base), shards it, pages the weights in,
then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and trains ``--steps`` steps of the plain loop
(``loss.backward()``; LoRAPrune: ``update_and_allocate(step)``; AdamW on the adapter) on a global batch of ``--batch``
× ``--seqlen`` tokens. Per rank: ``peak_rss_mb`` (VmHWM since the reset: loading the whole model before sharding is
not counted), ``model_rss_mb`` (RSS with the sharded model paged in), ``training_mb`` (their difference),
``runtime_rss_mb`` (RSS after the imports, before the model: not shardable) and ``load_peak_rss_mb`` (VmHWM just
before the reset: the whole-model load before sharding included). Ratios: the largest per-rank peak of a layout / the single process's peak.

    python benchmarks/distributed.py            # writes benchmarks/results/distributed.json
    python benchmarks/distributed.py --quick    # results/quick/distributed.json (short sequences, 2 steps)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import MEMORY_ENV, peak_rss_mb, reset_peak_rss, results_path, rss_mb, start_stamp, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("loraprune", "sparse_lora")
LAYOUTS = {"single": (1, False), "fsdp2x1": (1, True), "fsdp2x2": (2, True)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MEMORY_NOTE = (
    "Per rank, in fresh processes under MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=1 (freed tensors leave the "
    "process). peak_rss_mb = VmHWM after resetting it (echo 5 > /proc/self/clear_refs) once the sharded model is "
    "paged in, so the transient whole-model load before fully_shard is not counted (load_peak_rss_mb, VmHWM read just "
    "before the reset, includes it: every rank here loads the whole checkpoint before sharding; the reset also resets "
    "ru_maxrss). model_rss_mb = RSS at the reset; "
    "training_mb = peak_rss_mb - model_rss_mb; runtime_rss_mb = RSS after the imports (Python, torch, transformers: "
    "not shardable). Ratios: max over ranks of peak_rss_mb / the single process's peak_rss_mb."
)


def _windows(tok, seqlen: int, n: int):
    from prune_peft.data import shakespeare_texts
    from prune_peft.evaluation import tokenize_stream

    stream = tokenize_stream(shakespeare_texts("train"), tok, max_tokens=seqlen * n)
    k = stream.numel() // seqlen
    return stream[: k * seqlen].reshape(k, seqlen)


def _model(config: str, base):
    from peft import get_peft_model

    from prune_peft import LoRAPruneConfig, SparseLoraConfig, prune

    if config == "loraprune":
        return get_peft_model(base, LoRAPruneConfig(r=8, target_sparsity=0.5, prune_every=1, warmup=0.0))
    prune(base, method="magnitude", sparsity=0.5)  # SparseLoRA keeps the base's zeros
    return get_peft_model(base, SparseLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))


def worker(args) -> dict:
    """One rank: load, adapt, shard, page in, reset the peak, train; returns this rank's record."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world, shard = LAYOUTS[args.layout]
    if shard:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if shard else 0
    from prune_peft import _dist
    from prune_peft.models import load_model_and_tokenizer

    runtime = rss_mb()
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer("smollm2-135m")
    model = _model(args.worker, base)
    del base
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    if args.worker == "loraprune":
        model.base_model.prepare_pruning(total_steps=args.steps)
    model.train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=2e-4)
    data = _windows(tok, args.seqlen, args.batch * args.steps)
    per_rank = args.batch // world
    with torch.no_grad():  # page every (local) weight in before the reference point
        for p in model.parameters():
            _dist.local(p).add_(0)
    model_rss = rss_mb()
    load_peak = peak_rss_mb()
    reset_peak_rss()
    losses = []
    for step in range(args.steps):
        rows = data[step * args.batch + rank * per_rank : step * args.batch + (rank + 1) * per_rank]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        if args.worker == "loraprune":
            model.base_model.update_and_allocate(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peak = peak_rss_mb()
    record = {
        "rank": rank,
        "world_size": world,
        "sharded": _dist.sharding_kind(model),
        "peak_rss_mb": peak,
        "model_rss_mb": model_rss,
        "training_mb": peak - model_rss,
        "runtime_rss_mb": runtime,
        "load_peak_rss_mb": load_peak,
        "losses": losses,
        "per_rank_batch": per_rank,
    }
    if shard:
        torch.distributed.destroy_process_group()
    return record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: str, layout: str, args) -> list[dict]:
    """Launch one layout in fresh processes; the per-rank records in rank order."""
    world, shard = LAYOUTS[layout]
    env = {**os.environ, **MEMORY_ENV, "OMP_NUM_THREADS": str(max(1, args.threads // world))}
    with tempfile.TemporaryDirectory() as out:
        cmd = [__file__, "--worker", config, "--layout", layout, "--record-dir", out]
        cmd += ["--batch", str(args.batch), "--seqlen", str(args.seqlen), "--steps", str(args.steps)]
        if shard:
            launch = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                      f"--master_port={_free_port()}"]  # fmt: skip
            cmd = launch + cmd
        proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{config}/{layout} failed:\n{proc.stderr[-4000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per layout (divided over its ranks)")
    ap.add_argument("--with-one-rank", action="store_true", help="also the fsdp2x1 layout (FSDP2 on a mesh of 1)")
    ap.add_argument("--quick", action="store_true", help="a smoke run into results/quick/")
    ap.add_argument("--out", default=None, help="results file (default: results/distributed.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        record = worker(args)
        Path(args.record_dir, f"rank{record['rank']}.json").write_text(json.dumps(record))
        return 0
    if args.quick:
        args.batch, args.seqlen, args.steps = 2, 64, 2
    if args.batch % 2:
        raise ValueError(f"--batch must be even (split over 2 ranks), got {args.batch}")
    layouts = [k for k in LAYOUTS if k != "fsdp2x1" or args.with_one_rank]
    stamp = start_stamp(args.threads, args.quick)
    start = time.perf_counter()
    memory: dict = {}
    for config in CONFIGS:
        measured = {}
        for layout in sorted(layouts, key=lambda k: -LAYOUTS[k][0]):  # the 2-rank launch first: it fails soonest
            measured[layout] = measure(config, layout, args)
            peaks = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in measured[layout])
            print(f"[{config:11s} {layout:8s}] peak RSS per rank {peaks} MB", flush=True)
        memory[config] = {layout: measured[layout] for layout in layouts}
    ratios = {}
    for config, measured in memory.items():
        single = measured["single"][0]["peak_rss_mb"]
        for layout in layouts[1:]:
            ratios[f"{config}_{layout}_vs_single_peak_rss"] = max(r["peak_rss_mb"] for r in measured[layout]) / single
    report = {
        "model": "smollm2-135m",
        "memory": memory,
        "ratios": ratios,
        "memory_method": MEMORY_NOTE,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "layout", "record_dir", "out")},
        "total_seconds": time.perf_counter() - start,
    }
    for k, v in ratios.items():
        print(f"{k:44s} {v:.3f}×")
    write_results("distributed", report, stamp, quick=args.quick, out=args.out)
    print(f"{results_path('distributed', args.quick, args.out)} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
