"""Sparsity-preserving adapters vs plain LoRA on the embedded SmolLM2-135M, 2:4-pruned (Wanda), fp32 or bf16 on CPU.

Measured in one run, batch 4 × 256 tokens of the Shakespeare training split, rank 16 for the LoRA types:

* step time (forward + backward + AdamW) of SparseLoRA (exact and LoRS gradients) and SPP (fused and blockwise) as
  ratios to plain LoRA. All adapters are trained side by side, one step each in turn on the same batch (the order
  rotating every round), so load on the machine hits them alike; each round is a pair (adapter step / LoRA step of
  that round), and the median and spread of those per-round ratios are reported. Goal ≤ 1.15×.
* peak memory, each config in its own process (``_bench.MEMORY_METHOD``): peak RSS during training steps, total and
  above the loaded model (the training part: activations, gradients, optimizer state, transients), as ratios to
  plain LoRA's process. Goal ≤ 1.10×.
* held-out perplexity after the same number of steps, and the sparsity of the pruned layers after merging (plain LoRA
  densifies them; the others keep every zero).

* ``--dtype bf16``: the pruned model in bf16 (adapters in fp32, as peft keeps them). Each sparse adapter is also
  trained as a copy running the pre-0.x fused path (``x · bf16(W + ΔW)ᵀ``, which rounds away updates below half an
  ulp of the weight; ``prune_peft.sparsity.adapters._LEGACY_ROUNDED_FUSE``, benchmark-only) side by side in the same
  rotation, and ``vs_legacy`` gives the per-round ratio (current step / legacy step of that round).

    python benchmarks/adapters.py [--steps 20] [--nsamples 32] [--eval-windows 16] [--threads 2] [--dtype fp32|bf16]

Writes benchmarks/results/adapters.json (``--dtype bf16``: adapters_bf16.json; ``--quick``: results/quick/), stamped.
Never run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time

from _bench import MEMORY_METHOD, memory_record, paired, rss_mb, run_memory_worker, start_stamp, write_results

BATCH, SEQLEN, RANK = 4, 256, 16
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LEGACY = "@legacy"  # suffix of the copies that run the old rounded fused path (bf16 only)
CONFIGS = ("lora", "sparse_lora", "sparse_lora_lors", "spp", "spp_blockwise")
LR = {"lora": 5e-4, "sparse_lora": 5e-4, "sparse_lora_lors": 5e-4, "spp": 4e-3, "spp_blockwise": 4e-3}


def make_config(name: str):
    from peft import LoraConfig

    from prune_peft import SparseLoraConfig, SPPConfig

    lora = dict(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    return {
        "lora": lambda: LoraConfig(**lora),
        "sparse_lora": lambda: SparseLoraConfig(**lora),
        "sparse_lora_lors": lambda: SparseLoraConfig(**lora, grad_mode="lors"),
        "spp": lambda: SPPConfig(target_modules="all-linear"),  # paper defaults: r=8, alpha=16, R=16
        "spp_blockwise": lambda: SPPConfig(target_modules="all-linear", forward_mode="blockwise"),
    }[name]()


def batches(tok, steps: int):
    from prune_peft.data import calibration_tokens, shakespeare_texts

    windows = calibration_tokens(shakespeare_texts("train"), tok, nsamples=steps * BATCH, seqlen=SEQLEN, seed=1)
    return [windows[i * BATCH : (i + 1) * BATCH] for i in range(steps)]


@contextlib.contextmanager
def legacy_fused(enabled: bool):
    """The pre-fix fused path (update rounded into a half-precision weight), for timing comparisons only."""
    from prune_peft.sparsity import adapters

    old = adapters._LEGACY_ROUNDED_FUSE
    adapters._LEGACY_ROUNDED_FUSE = enabled
    try:
        yield
    finally:
        adapters._LEGACY_ROUNDED_FUSE = old


def pruned_layer_sparsity(model) -> float:
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


NAMES = {
    "lora": "LoRA (peft)",
    "sparse_lora": "SparseLoRA, exact grads",
    "sparse_lora_lors": 'SparseLoRA, `grad_mode="lors"`',
    "spp": "SPP, fused",
    "spp_blockwise": "SPP, blockwise",
}


def table(result: dict) -> str:
    """The README table (markdown) for a finished run."""
    rows = [
        "| adapter | step time | peak RSS | training memory | ppl after "
        f"{result['steps']} steps (merged) | sparsity after merge |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["adapters"].items():
        rows.append(
            f"| {NAMES.get(name, name)} | {r['step_s']:.1f} s ({r['time_ratio']:.2f}×) | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB ({r['peak_rss_ratio']:.2f}×) | "
            f"{r['training_mb'] / 1024:.2f} GB ({r['training_mem_ratio']:.2f}×) | {r['ppl_merged']:.2f} | "
            f"{r['sparsity_after_merge']:.4f} |"
        )
    head = (
        f"SmolLM2-135M, Wanda 2:4 (sparsity {result['sparsity_pruned']:.4f}), batch {result['batch'][0]} × "
        f"{result['batch'][1]} tokens, {result['dtype']}, {result['threads']} CPU threads, rank {result['rank']} for the LoRA "
        f"types. Held-out perplexity: dense {result['ppl_dense']:.2f}, pruned {result['ppl_pruned']:.2f}."
    )
    legacy = [
        f"{NAMES.get(n, n)} {r['vs_legacy']['median']:.2f}×"
        for n, r in result["adapters"].items()
        if r.get("vs_legacy") is not None
    ]
    if legacy:
        rows.append(
            "\nStep time of the current half-precision path / the old fused path that rounded the update into the "
            "bf16 weight (same rounds): " + ", ".join(legacy) + "."
        )
    return head + "\n\n" + "\n".join(rows)


PHASES = ("forward", "backward", "optimizer")


def phase_times(marks: list[tuple[float, float]]) -> dict[str, float]:
    """Wall and process-CPU seconds of forward, backward and optimizer from (perf_counter, process_time) marks."""
    out = {}
    for i, phase in enumerate(PHASES):
        out[phase] = marks[i + 1][0] - marks[i][0]
        out[phase + "_cpu"] = marks[i + 1][1] - marks[i][1]
    return out


def gemm_floor(model, tokens: int, reps: int = 5) -> dict:
    """Time of the exact mode's one extra GEMM per layer, ``Gᵀ X`` (tokens × d_out)ᵀ (tokens × d_in), summed over the
    SparseLoRA layers of ``model`` at their real shapes in the compute dtype; interleaved with the same layers' base
    forward GEMM ``X Wᵀ`` (the reference: the extra GEMM has the forward's size). Medians of ``reps`` rounds."""
    import torch

    from prune_peft.tuners.sparse_lora.layer import SparseLoraLinear

    shapes: dict[tuple[int, int], int] = {}
    dtype = None
    for module in model.modules():
        if isinstance(module, SparseLoraLinear):
            w = module.get_base_layer().weight
            dtype = w.dtype
            shapes[tuple(w.shape)] = shapes.get(tuple(w.shape), 0) + 1
    gen = torch.Generator().manual_seed(0)
    timing: dict[str, dict[str, list[float]]] = {"extra": {"wall": [], "cpu": []}, "base": {"wall": [], "cpu": []}}
    for _ in range(reps):
        tot = {k: [0.0, 0.0] for k in timing}
        for (d_out, d_in), count in shapes.items():
            x = torch.randn(tokens, d_in, generator=gen).to(dtype)
            g = torch.randn(tokens, d_out, generator=gen).to(dtype)
            w = torch.randn(d_out, d_in, generator=gen).to(dtype)
            for kind, (a, b) in (("extra", (g.t(), x)), ("base", (x, w.t()))):
                t0, c0 = time.perf_counter(), time.process_time()
                torch.mm(a, b)
                tot[kind][0] += (time.perf_counter() - t0) * count
                tot[kind][1] += (time.process_time() - c0) * count
        for kind, (wall, cpu) in tot.items():
            timing[kind]["wall"].append(wall)
            timing[kind]["cpu"].append(cpu)
    med = {k: {t: statistics.median(v) for t, v in d.items()} for k, d in timing.items()}
    return {
        "layers": sum(shapes.values()),
        "shapes": {f"{o}x{i}": n for (o, i), n in shapes.items()},
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "extra_gemm_s": med["extra"]["wall"],
        "extra_gemm_cpu_s": med["extra"]["cpu"],
        "base_forward_gemm_s": med["base"]["wall"],
        "base_forward_gemm_cpu_s": med["base"]["cpu"],
    }


def backward_profile(models: dict, ids, names: list[str], rounds: int = 2, top: int = 8) -> dict:
    """torch.profiler CPU time of one backward per adapter, ``rounds`` times in alternating order: the total
    self-CPU time of all ops and the ops that take most of it (last round)."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, list[float]] = {n: [] for n in names}
    tops: dict[str, list[dict]] = {}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            m = models[name]
            loss = m(input_ids=ids, labels=ids).loss
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss.backward()
            m.zero_grad(set_to_none=True)
            events = prof.key_averages()
            totals[name].append(sum(e.self_cpu_time_total for e in events) / 1e6)
            ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
            tops[name] = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ranked]
    return {
        "backward_cpu_s": {n: statistics.median(v) for n, v in totals.items()},
        "backward_cpu_vs_lora": {
            n: statistics.median(v) / statistics.median(totals["lora"]) for n, v in totals.items()
        },
        "top_ops": tops,
    }


def profile(models: dict, phases: dict[str, list[dict]], times: dict[str, list[float]], ids, rounds: int) -> dict:
    """Per-phase breakdown (forward / backward / optimizer, wall and process CPU time, medians of the timed rounds
    and per-round ratios to LoRA's same phase), the extra-GEMM floor of the exact mode, and profiler CPU time of
    the backward."""
    timed = {n: p[2:] or p for n, p in phases.items()}
    lora = timed["lora"]
    per: dict[str, dict] = {}
    for name, rows in timed.items():
        rec: dict = {}
        for key in rows[0]:
            rec[key + "_s"] = statistics.median(r[key] for r in rows)
            rec[key + "_vs_lora"] = statistics.median(r[key] / b[key] for r, b in zip(rows, lora) if b[key] > 0)
        per[name] = rec
    floor = gemm_floor(models["sparse_lora"], BATCH * SEQLEN)
    lora_step = statistics.median(times["lora"][2:] or times["lora"])
    lora_cpu = statistics.median(sum(r[p + "_cpu"] for p in PHASES) for r in lora)
    summary = {
        "lora_step_s": lora_step,
        # the exact mode does one more dense GEMM per layer than LoRA: LoRA's step plus those GEMMs is its floor
        "exact_floor_ratio": (lora_step + floor["extra_gemm_s"]) / lora_step,
        "exact_floor_ratio_cpu": (lora_cpu + floor["extra_gemm_cpu_s"]) / lora_cpu,
    }
    if floor["dtype"] in ("bfloat16", "float16"):
        # half precision: the forward and ∂L/∂x GEMMs run over [W | ΔW] (twice the base's inner dimension, so the
        # update is never rounded into W): two more GEMMs of the forward's size per layer than LoRA's base GEMMs
        more = floor["extra_gemm_s"] + 2 * floor["base_forward_gemm_s"]
        more_cpu = floor["extra_gemm_cpu_s"] + 2 * floor["base_forward_gemm_cpu_s"]
        summary["half_split_floor_ratio"] = (lora_step + more) / lora_step
        summary["half_split_floor_ratio_cpu"] = (lora_cpu + more_cpu) / lora_cpu
    if "sparse_lora" in timed:
        sl = timed["sparse_lora"]
        extra = statistics.median(r["backward"] - b["backward"] for r, b in zip(sl, lora))
        summary["exact_step_vs_lora"] = statistics.median(
            sum(r[p] for p in PHASES) / sum(b[p] for p in PHASES) for r, b in zip(sl, lora)
        )
        summary["exact_backward_minus_lora_s"] = extra
        summary["exact_backward_excess_over_extra_gemm"] = extra / floor["extra_gemm_s"]
        extra_cpu = statistics.median(r["backward_cpu"] - b["backward_cpu"] for r, b in zip(sl, lora))
        summary["exact_backward_excess_over_extra_gemm_cpu"] = extra_cpu / floor["extra_gemm_cpu_s"]
        if "sparse_lora_lors" in timed:  # the same forward and ∂L/∂x; the difference is M ⊙ Gᵀ X and its use
            lors = timed["sparse_lora_lors"]
            step = lambda r: sum(r[p] for p in PHASES)  # noqa: E731
            summary["exact_minus_lors_s"] = statistics.median(step(r) - step(b) for r, b in zip(sl, lors))
            summary["exact_minus_lors_over_extra_gemm"] = summary["exact_minus_lors_s"] / floor["extra_gemm_s"]
    names = [n for n in ("lora", "sparse_lora", "sparse_lora_lors") if n in models]
    return {
        "what": "medians over timed rounds; *_vs_lora: median of per-round ratios to LoRA's same phase; *_cpu: "
        "process CPU time (all threads). exact_floor_ratio = (LoRA step + one extra GEMM Gᵀ X per SparseLoRA "
        "layer at its real shape) / LoRA step, the lowest step-time ratio the exact mode can reach while it "
        "computes that GEMM densely",
        "phases": per,
        "extra_gemm": floor,
        "summary": summary,
        "backward_profiler": backward_profile(models, ids, names, rounds),
    }


def memory_worker(name: str, checkpoint: str, steps: int, threads: int, dtype: str = "fp32") -> dict:
    """Peak RSS of a few training steps, in a fresh process holding only this model."""
    import torch
    from peft import get_peft_model

    from prune_peft.models import load_model_and_tokenizer

    torch.set_num_threads(threads)
    model, tok = load_model_and_tokenizer(checkpoint)
    model = get_peft_model(model.to(getattr(torch, DTYPES[dtype])), make_config(name))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[name])
    data = batches(tok, steps)
    with torch.no_grad():  # page everything in before the baseline
        for p in model.parameters():
            p.add_(0)
    before = rss_mb()
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mem = memory_record(before)
    return {"config": name, "rss_before_mb": before, "peak_rss_mb": mem["peak_rss_mb"], "training_mb": mem["extra_mb"]}


def run_worker(name: str, checkpoint: str, steps: int, threads: int, dtype: str = "fp32") -> dict:
    cmd = [__file__, "--worker", name, "--checkpoint", checkpoint, "--steps", str(steps), "--threads", str(threads)]
    cmd += ["--dtype", dtype]
    return run_memory_worker(cmd, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per adapter (all timed but the first 2)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=32, help="Wanda calibration sequences")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 256 tokens")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (bf16: also the old path)")
    parser.add_argument("--quick", action="store_true", help="3 steps, lora + sparse_lora only; results/quick/")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per-phase breakdown and extra-GEMM floor only "
        "(no perplexities, no memory processes); writes results/quick/adapters_profile.json",
    )
    parser.add_argument("--profile-rounds", type=int, default=2, help="profiled backward passes per adapter")
    parser.add_argument("--out", default=None, help="results file (default: results/adapters.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.checkpoint, args.steps, args.threads, args.dtype)))
        return

    import torch
    from peft import get_peft_model

    from prune_peft import perplexity, prune
    from prune_peft.data import shakespeare_texts
    from prune_peft.models import load_model_and_tokenizer

    if args.quick:
        args.steps, args.nsamples, args.eval_windows, args.memory_steps = 4, 4, 2, 1
        args.configs = ["lora", "sparse_lora"]
    if args.profile and args.configs == list(CONFIGS):
        args.configs = ["lora", "sparse_lora", "sparse_lora_lors"]
    if args.profile and "sparse_lora" not in args.configs:
        raise ValueError(
            f"--profile measures the exact mode's floor: --configs must include 'sparse_lora', got {args.configs}"
        )
    if "lora" not in args.configs:
        raise ValueError(f"--configs must include 'lora' (the denominator of every ratio), got {args.configs}")
    torch.set_num_threads(args.threads)
    stamp = start_stamp(args.threads, args.quick)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    held = shakespeare_texts("heldout")

    def ppl(m) -> float:
        if args.profile:
            return float("nan")
        return perplexity(m, tok, held, seqlen=SEQLEN, max_windows=args.eval_windows)

    result: dict = {
        "model": "smollm2-135m",
        "pruning": f"wanda 2:4, {args.nsamples}×512 calibration tokens",
        "batch": [BATCH, SEQLEN],
        "rank": RANK,
        "dtype": DTYPES[args.dtype],
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "learning_rates": {k: LR[k] for k in args.configs},
        "ppl_dense": ppl(model),
    }
    prune(model, method="wanda", pattern="2:4", calibration=shakespeare_texts("train"), tokenizer=tok,
          nsamples=args.nsamples, seqlen=512, progress=False)  # fmt: skip
    result["ppl_pruned"] = ppl(model)
    result["sparsity_pruned"] = pruned_layer_sparsity(model)
    print(f"dense ppl {result['ppl_dense']:.2f}, 2:4 ppl {result['ppl_pruned']:.2f}", flush=True)
    model = model.to(getattr(torch, DTYPES[args.dtype]))

    with tempfile.TemporaryDirectory() as ckpt:
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        memory = {}
        for name in [] if args.profile else args.configs:
            memory[name] = run_worker(name, ckpt, args.memory_steps, args.threads, args.dtype)
            print(f"memory {name}: {memory[name]}", flush=True)

    # side by side: one step per adapter in turn, same batch, so machine load hits all of them alike
    models = {name: get_peft_model(copy.deepcopy(model), make_config(name)).train() for name in args.configs}
    if args.dtype != "fp32" and not args.profile:  # the same adapters on the old rounded fused path, same rotation
        models.update({n + LEGACY: copy.deepcopy(m) for n, m in list(models.items()) if n != "lora"})
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR[name.removesuffix(LEGACY)])
        for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for step, ids in enumerate(batches(tok, args.steps)):
        order = list(models)[step % len(models) :] + list(models)[: step % len(models)]  # rotate who goes first
        for name in order:
            m = models[name]
            marks = [(time.perf_counter(), time.process_time())]
            with legacy_fused(name.endswith(LEGACY)):
                loss = m(input_ids=ids, labels=ids).loss
                marks.append((time.perf_counter(), time.process_time()))
                loss.backward()
                marks.append((time.perf_counter(), time.process_time()))
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            marks.append((time.perf_counter(), time.process_time()))
            times[name].append(marks[-1][0] - marks[0][0])
            phases[name].append(phase_times(marks))
            losses[name].append(loss.item())
        print(f"step {step}: " + ", ".join(f"{n} {times[n][-1]:.1f}s" for n in models), flush=True)
    if "sparse_lora" in models:  # the exact mode's floor and the per-phase breakdown
        result["profile"] = profile(models, phases, times, ids, args.profile_rounds)
        print("profile: " + json.dumps(result["profile"]["summary"]), flush=True)
    if args.profile:  # the breakdown only: no perplexities, no memory processes
        result["seconds"] = time.perf_counter() - t_start
        name = "adapters_profile" if args.dtype == "fp32" else f"adapters_{args.dtype}_profile"
        write_results(name, result, stamp, quick=True, out=args.out)
        print(json.dumps(result["profile"], indent=2))
        return

    per = {}
    base_time = statistics.median(times["lora"][2:])
    base_mem = memory["lora"]
    for name in args.configs:
        m = models[name].eval()
        unmerged = ppl(m)
        merged = m.merge_and_unload()
        rounds = paired([a / b for a, b in zip(times[name][2:], times["lora"][2:])], f"{name} step", "LoRA step")
        old = times.get(name + LEGACY)
        vs_legacy = None
        if old:
            pairs = [a / b for a, b in zip(times[name][2:], old[2:])]
            vs_legacy = {
                **paired(pairs, f"{name} step", "old fused step"),
                "legacy_step_s": statistics.median(old[2:]),
            }
            vs_legacy["legacy_loss_first_last"] = [losses[name + LEGACY][0], losses[name + LEGACY][-1]]
        per[name] = {
            "step_s": statistics.median(times[name][2:]),
            "time_ratio": rounds["median"],
            "time_ratio_pairs": rounds,
            "lora_step_s": base_time,
            "peak_rss_mb": memory[name]["peak_rss_mb"],
            "peak_rss_ratio": memory[name]["peak_rss_mb"] / base_mem["peak_rss_mb"],
            "training_mb": memory[name]["training_mb"],
            "training_mem_ratio": memory[name]["training_mb"] / base_mem["training_mb"],
            "loss_first_last": [losses[name][0], losses[name][-1]],
            "vs_legacy": vs_legacy,
            "ppl_unmerged": unmerged,
            "ppl_merged": ppl(merged),
            "sparsity_after_merge": pruned_layer_sparsity(merged),
        }
        print(f"{name}: {per[name]}", flush=True)
    result["adapters"] = per
    result["memory_method"] = MEMORY_METHOD
    result["ratios"] = {
        "time_ratio": "median over timed rounds of (adapter step time / LoRA step time in the same round)",
        "peak_rss_ratio": "adapter process peak RSS / LoRA process peak RSS (both include the loaded model)",
        "training_mem_ratio": "adapter process extra_mb / LoRA process extra_mb (memory added by training steps)",
        "vs_legacy": "bf16: median over rounds of (adapter step / the same adapter on the old rounded fused path)",
    }
    result["seconds"] = time.perf_counter() - t_start
    result["table_md"] = table(result)
    name = "adapters" if args.dtype == "fp32" else f"adapters_{args.dtype}"
    write_results(name, result, stamp, quick=args.quick, out=args.out)
    print(json.dumps(result, indent=2))
    print(result["table_md"])


if __name__ == "__main__":
    main()
