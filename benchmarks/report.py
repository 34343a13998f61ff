"""Regenerate every published benchmark figure from ``benchmarks/results/*.json``.

README.md and docs/*.md hold generated sections between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
this script rewrites them from the results files (never anything outside the markers).

    python benchmarks/report.py            # rewrite the marked sections
    python benchmarks/report.py --check    # exit 1, printing a diff, when a doc disagrees with the results

Conventions: headlines are the default settings (alternatives are labelled "alternative"); a goal is shown as met or
**missed**; ratios measured as pairs show their median and spread; every section says which run it comes from
(commit, load) or "(unstamped run)" for a results file written before the stamp existed. Quick runs
(``results/quick/``) are never read.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (
    "README.md",
    "docs/adapters.md",
    "docs/distill.md",
    "docs/kernels.md",
    "docs/loraprune.md",
    "docs/qtuning.md",
    "docs/distributed.md",
    "docs/oneshot.md",
)
MARKER = re.compile(r"<!-- report:(?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)

Results = dict[str, dict | None]


# ------------------------------------------------------------------------------------------------------ formatting


def x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def spread(p: dict | None, digits: int = 2) -> str:
    """'1.18× (1.10–1.25, 5 pairs)' from a ``_bench.paired`` record."""
    if not p:
        return ""
    return f" ({p['min']:.{digits}f}–{p['max']:.{digits}f} over {p['n']} pair{'s' if p['n'] != 1 else ''})"


def paired_from_list(ratios: list[float]) -> dict | None:
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def goal(value: float | None, op: str, target: str) -> str:
    """'≤ 1.15× — met' / '≤ 1.15× — **missed**' (judged on the unrounded value; ``target`` as printed)."""
    if value is None:
        return f"{op} {target}× — not measured"
    ok = value <= float(target) if op == "≤" else value >= float(target)
    return f"{op} {target}× — " + ("met" if ok else "**missed**")


def run_note(data: dict | None) -> str:
    """Where a figure comes from: commit, dirty flag, load; '(unstamped run)' for files without a stamp."""
    if data is None:
        return "no results file"
    stamp = data.get("stamp")
    if not stamp:
        return "(unstamped run)"
    commit = (stamp.get("git_commit") or "unknown")[:7] + ("+dirty" if stamp.get("git_dirty") else "")
    load = f"load {stamp.get('load_1min_start', 0):.1f}→{stamp.get('load_1min_end', 0):.1f}"
    note = f"commit {commit}, {stamp.get('threads')} threads, {load}"
    if stamp.get("loaded"):
        note += ", **loaded machine**"
    return note


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pairs_cell(p: dict | None, digits: int = 2) -> str:
    """'1.18× (1.10–1.25 over 5 pairs)' from a ``_bench.paired`` record; 'not measured' when the results file
    predates the key."""
    return "not measured" if not p else f"{x(p['median'], digits)}{spread(p, digits)}"


def missing(what: str, how: str) -> str:
    return f"**not yet measured** — no `benchmarks/results/{what}.json`; `{how}` produces it."


# ------------------------------------------------------------------------------------------------------- sections


def _adapter_rows(a: dict) -> dict[str, dict]:
    return a["adapters"]


def _time_ratio(r: dict) -> tuple[float, str]:
    return r["time_ratio"], spread(r.get("time_ratio_pairs"))


def readme_benchmarks(res: Results) -> str:
    rows: list[list[str]] = []
    o = res.get("oneshot")
    if o:
        w, s = o["runs"]["wanda"], o["runs"]["sparsegpt"]
        ppl = o["ppl"]
        rows += [
            ["one-shot (`benchmarks/oneshot.py`)",
             f"held-out ppl dense → Wanda 2:4 / SparseGPT 50 % ({o['calibration']})",
             f"{ppl['dense']:.1f} → {ppl['wanda_2:4']:.1f} / {ppl['sparsegpt_50%']:.1f}", "–", run_note(o)],
            ["", "(peak RSS − runtime) ÷ model bytes while pruning: Wanda / SparseGPT",
             f"{x(w['peak_rss_over_model'])} / {x(s['peak_rss_over_model'])}",
             goal(max(w["peak_rss_over_model"], s["peak_rss_over_model"]), "≤", "1.5"), ""],
            ["", "wall time of `prune`: Wanda / SparseGPT", f"{w['prune_seconds']:.0f} s / {s['prune_seconds']:.0f} s",
             "–", ""],
        ]  # fmt: skip
    else:
        rows.append(["one-shot", "ppl, memory, time", missing("oneshot", "make bench"), "≤ 1.5×", ""])
    a = res.get("adapters")
    if a:
        ad = _adapter_rows(a)
        sl, t = _time_ratio(ad["sparse_lora"])
        head = f"adapters (`benchmarks/adapters.py`, 2:4 base, {a['batch'][0]} × {a['batch'][1]}, r={a['rank']})"
        rows.append([head, "SparseLoRA (default `grad_mode=\"exact\"`) step time ÷ LoRA", f"{x(sl)}{t}",
                     goal(sl, "≤", "1.15"), run_note(a)])  # fmt: skip
        rows.append(["", "SparseLoRA training memory ÷ LoRA's (extra RSS above the loaded model)",
                     x(ad["sparse_lora"]["training_mem_ratio"]), goal(ad["sparse_lora"]["training_mem_ratio"], "≤", "1.10"),
                     ""])  # fmt: skip
        b16 = res.get("adapters_bf16")
        if b16 and "sparse_lora" in b16["adapters"]:
            bt, bts = _time_ratio(b16["adapters"]["sparse_lora"])
            rows.append(["", f"SparseLoRA (exact) step time ÷ LoRA, {b16['dtype']} model (half-precision path)",
                         f"{x(bt)}{bts}", goal(bt, "≤", "1.15"), run_note(b16)])  # fmt: skip
        if "sparse_lora_lors" in ad:
            lt, lts = _time_ratio(ad["sparse_lora_lors"])
            rows.append(["", 'alternative: SparseLoRA `grad_mode="lors"` step time / training memory ÷ LoRA',
                         f"{x(lt)}{lts} / {x(ad['sparse_lora_lors']['training_mem_ratio'])}", "–", ""])  # fmt: skip
        if "spp" in ad:
            st, sts = _time_ratio(ad["spp"])
            rows.append(["", "SPP (default fused) step time / training memory ÷ LoRA",
                         f"{x(st)}{sts} / {x(ad['spp']['training_mem_ratio'])}",
                         f"time {goal(st, '≤', '1.15')}; memory {goal(ad['spp']['training_mem_ratio'], '≤', '1.10')}",
                         ""])  # fmt: skip
        if "spp_blockwise" in ad:
            bt, bts = _time_ratio(ad["spp_blockwise"])
            rows.append(["", "alternative: SPP `forward_mode=\"blockwise\"` step time / training memory ÷ LoRA",
                         f"{x(bt)}{bts} / {x(ad['spp_blockwise']['training_mem_ratio'])}", "–", ""])  # fmt: skip
        spars = " / ".join(f"{ad[k]['sparsity_after_merge']:.0%}" for k in ("lora", "sparse_lora", "spp") if k in ad)
        rows.append(["", "sparsity after merge: LoRA / SparseLoRA / SPP", spars, "keep zeros", ""])
    else:
        rows.append(["adapters", "step time, memory", missing("adapters", "make bench"), "≤ 1.15× / ≤ 1.10×", ""])
    lp = res.get("loraprune")
    if lp and "cost" in lp:
        c = lp["cost"]
        tr, ts = _loraprune_time(c)
        m = c["ratios"]
        rows.append(["LoRAPrune (`benchmarks/loraprune.py`, 4 × 256)", "step wall time ÷ plain LoRA",
                     f"{x(tr)}{ts}", _loraprune_goal(c), run_note(lp)])  # fmt: skip
        rows.append(["", "peak RSS ÷ plain LoRA's (4 × 256)", x(m["loraprune_vs_lora_peak_rss@4x256"]),
                     goal(m["loraprune_vs_lora_peak_rss@4x256"], "≤", "1.05"), ""])  # fmt: skip
        g1, g2 = m["loraprune_vs_grad_training_memory@4x256"], m["loraprune_vs_grad_training_memory@1x128"]
        rows.append(["", "training memory ÷ full-weight-gradient importance's: 4 × 256 / 1 × 128",
                     f"{x(g1)} / {x(g2)}", goal(min(g1, g2), "≤", "0.6"), ""])  # fmt: skip
    if lp and "quality" in lp:
        q = lp["quality"]
        rows.append(["" if lp and "cost" in lp else "LoRAPrune",
                     f"held-out ppl after {q['settings']['quality_steps']} steps (dense {q['dense_ppl']:.1f}): "
                     "LoRAPrune vs one-shot structured magnitude + LoRA (one run; seeded: docs/loraprune.md)",
                     f"20 %: {q['loraprune@20%']['ppl']:.1f} vs {q['magnitude+lora@20%']['ppl']:.1f}; "
                     f"50 %: {q['loraprune@50%']['ppl']:.1f} vs {q['magnitude+lora@50%']['ppl']:.1f}", "report", ""])  # fmt: skip
    if not lp:
        rows.append(["LoRAPrune", "step time, memory", missing("loraprune", "make bench"), "≤ 1.10×", ""])
    qt = res.get("qtuning")
    if qt:
        pt = _qtuning_paired(qt)
        rows.append([f"Q-Tuning (`benchmarks/qtuning.py`, {qt['settings']['n_train']} samples, LoRA r=8)",
                     "two-pass 25 % × 50 % ÷ full-data SFT, wall time (paired median)",
                     f"{x(pt['median'])}{spread(pt)}", goal(pt["median"], "≤", "0.5"), run_note(qt)])  # fmt: skip
        vf = qt["paired_timing"].get("vs_floor")
        rows.append(["", "two-pass ÷ its floor (no-grad scoring + SFT on the kept share), wall time (paired median)",
                     pairs_cell(vf), _paired_goal(vf, "≤", "1.10"), ""])  # fmt: skip
        rows.append(["", "alternative: one full epoch each (a single pair)", x(qt["ratios_vs_full"]["qtuning_wall"]),
                     "–", ""])  # fmt: skip
        r = qt["runs"]
        rows.append(["", "held-out loss: base / full / Q-Tuning 25 % × 50 % / random 25 % same steps / random "
                     "12.5 % (one run; seeded: docs/qtuning.md)",
                     f"{qt['heldout_loss_base']:.2f} / {r['full']['heldout_loss']:.2f} / "
                     f"{r['qtuning_25x50']['heldout_loss']:.2f} / {r['random_25%_same_steps']['heldout_loss']:.2f} / "
                     f"{r['random_12.5%']['heldout_loss']:.2f}", "report", ""])  # fmt: skip
    else:
        rows.append(["Q-Tuning", "epoch time", missing("qtuning", "make bench"), "≤ 0.5×", ""])
    d = res.get("distill")
    if d:
        tp = d["throughput"]
        rows.append([f"distillation (`benchmarks/distill.py`, {tp['prompts']} prompts of ≈ {tp['mean_prompt_tokens']:.0f}"
                     f" tokens, {tp['max_new_tokens']} new tokens)",
                     "batched ÷ per-sample generation, wall time",
                     f"{x(tp['speedup_wall'])}{spread(tp.get('speedup_wall_pairs'))} (identical outputs: "
                     f"{tp['identical_outputs']:.0%}; decode step {x(tp['decode_step_speedup_cpu_time'])}, "
                     f"prefill {x(tp['prefill_speedup_cpu_time'])})", _distill_goal(tp), run_note(d)])  # fmt: skip
        q = d["quality"]
        rows.append(["", f"{q['layer_drop']['n']} of {q['layer_drop']['num_blocks_before']} blocks dropped, accuracy "
                     "after equal LoRA steps: original vs distilled data (one run; seeded: docs/distill.md)",
                     f"{q['sft_original']['accuracy']:.1%} vs {q['sft_distilled']['accuracy']:.1%} "
                     f"({q['sft_original']['n']} problems)", "report", ""])  # fmt: skip
    else:
        rows.append(["distillation", "generation speedup", missing("distill", "make bench"), "≥ 5×", ""])
    g = res.get("sparse24_gpu")
    if g:
        s = g["summary"]
        log_goal = [r["fwd_speedup"] for r in res.get("sparse24_gpu_rowmajor_log") or []
                    if r["tokens"] == 16384 and not r["transposable"] and r["dtype"] == "bf16"]  # fmt: skip
        later = f"; run B, the code at HEAD (log only): {x(min(log_goal))} / not measured" if log_goal else ""
        rows.append(["2:4 kernels (`benchmarks/sparse24_gpu.py`, " + g["env"]["gpu"] + ")",
                     "linear forward ÷ dense bf16 at the named shapes (worst of them) / SFT step",
                     f"run A: {x(s.get('goal_fwd_min_speedup'))} / {x(s.get('sft_step_speedup'))}{later} "
                     "([docs/kernels.md](docs/kernels.md#gpu-speed))",
                     f"{_gpu_goal(s.get('goal_fwd_1.6x_met'), 1.6)}; {_gpu_goal(s.get('goal_sft_1.2x_met'), 1.2)}",
                     run_note(g)])  # fmt: skip
    else:
        rows.append(["2:4 kernels (`benchmarks/sparse24_gpu.py`)", "linear fwd speedup, SFT step",
                     "**not yet measured** (needs an Ampere/Hopper GPU; `make bench-gpu`)", "≥ 1.6× / ≥ 1.2×", ""])  # fmt: skip
    return table(["area", "measurement", "result", "goal", "run"], rows)


def _paired_goal(p: dict | None, op: str, target: str) -> str:
    return goal(p["median"] if p else None, op, target)


def _gpu_goal(met: bool | None, target: float) -> str:
    if met is None:
        return f"≥ {target:g}× — named configuration not measured"
    return f"≥ {target:g}× — " + ("met" if met else "**missed**")


def _loraprune_time(c: dict) -> tuple[float, str]:
    p = c.get("paired", {}).get("loraprune_vs_lora_time")
    if p:
        return p["median"], spread(p)
    return c["ratios"]["loraprune_vs_lora_time"], " (medians of separate runs, not paired)"


def _loraprune_goal(c: dict) -> str:
    """The goal names interleaved pairs: medians of separate runs are judged, but marked as not that configuration."""
    tr, _ = _loraprune_time(c)
    verdict = goal(tr, "≤", "1.10")
    if not c.get("paired", {}).get("loraprune_vs_lora_time"):
        verdict += " (separate runs, not the goal's interleaved pairs)"
    return verdict


def _distill_goal(tp: dict) -> str:
    """≥ 5× with identical outputs: a faster batched path that changes any output misses the goal."""
    verdict = goal(tp["speedup_wall"], "≥", "5")
    if tp["identical_outputs"] < 1.0 and verdict.endswith("met"):
        verdict = verdict.removesuffix("met") + f"**missed** (outputs identical: {tp['identical_outputs']:.0%})"
    return verdict


def _qtuning_paired(q: dict) -> dict:
    pt = q["paired_timing"]
    return pt.get("wall") or paired_from_list([p["wall_ratio"] for p in pt["pairs"]])


def loraprune_cost(res: Results) -> str:
    lp = res.get("loraprune")
    if not lp or "cost" not in lp:
        return missing("loraprune", "make bench")
    c = lp["cost"]
    t, mem = c["time"], c["memory"]
    shapes = list(mem)
    names = {
        "lora": "LoRA",
        "loraprune": "LoRAPrune (LoRA-guided importance)",
        "grad": "full-weight-gradient importance",
    }
    header = ["configuration", "step wall", "step CPU"]
    for k in shapes:
        header += [f"peak RSS {k}", f"training mem {k}"]
    rows = []
    for cfg, label in names.items():
        row = [label, f"{t[cfg]['step_seconds_median']:.2f} s", f"{t[cfg]['step_cpu_seconds_median']:.2f} s"]
        for k in shapes:
            row += [f"{mem[k][cfg]['peak_rss_mb']:.0f} MB", f"{mem[k][cfg]['training_mb']:.0f} MB"]
        rows.append(row)
    r = c["ratios"]
    tr, ts = _loraprune_time(c)
    cpu = c.get("paired", {}).get("loraprune_vs_lora_cpu_time")
    cpu_v = cpu["median"] if cpu else r["loraprune_vs_lora_cpu_time"]
    ratio_rows = [
        ["LoRAPrune / LoRA, step wall time", f"{x(tr, 3)}{ts}", _loraprune_goal(c)],
        ["LoRAPrune / LoRA, step CPU time", f"{x(cpu_v, 3)}{spread(cpu)}", "–"],
    ]
    for k in shapes:
        ratio_rows.append([f"LoRAPrune / LoRA, peak RSS {k}",
                           f"{x(r[f'loraprune_vs_lora_peak_rss@{k}'], 3)} (training memory "
                           f"{x(r[f'loraprune_vs_lora_training_memory@{k}'], 3)})",
                           goal(r[f"loraprune_vs_lora_peak_rss@{k}"], "≤", "1.05")])  # fmt: skip
    for k in shapes:
        ratio_rows.append([f"LoRAPrune / full-gradient, training memory {k}",
                           f"{x(r[f'loraprune_vs_grad_training_memory@{k}'], 3)} (peak RSS "
                           f"{x(r[f'loraprune_vs_grad_peak_rss@{k}'], 3)})",
                           goal(r[f"loraprune_vs_grad_training_memory@{k}"], "≤", "0.6")])  # fmt: skip
    s = c.get("settings", {})
    head = (
        f"Run: {run_note(lp)}. Batch {s.get('batch', '?')} × {s.get('seqlen', '?')}, {s.get('threads', '?')} torch "
        "threads. Training memory = peak RSS minus the RSS with the model loaded, each configuration in its own "
        "process; a ratio's denominator is the configuration named after the slash."
    )
    return head + "\n\n" + table(header, rows) + "\n\n" + table(["ratio", "measured", "goal"], ratio_rows)


def loraprune_quality(res: Results) -> str:
    lp = res.get("loraprune")
    if not lp or "quality" not in lp:
        return missing("loraprune", "make bench")
    q = lp["quality"]
    rows = []
    for sp in ("20%", "50%"):
        a, b = q[f"loraprune@{sp}"], q[f"magnitude+lora@{sp}"]
        rows.append([f"{sp} ({a['pruned_kv_units']} KV units, {a['pruned_channels']} channels)",
                     f"{a['params'] / 1e6:.1f} M", f"{a['ppl']:.1f}", f"{b['ppl']:.1f}"])  # fmt: skip
    s = q["settings"]
    head = (
        f"Run: {run_note(lp)}. {s['quality_steps']} optimizer steps of {s['quality_batch']} × {s['seqlen']} tokens, "
        f"held-out perplexity of the compacted model ({s['eval_windows']} windows of 512; dense {q['dense_ppl']:.2f})."
    )
    header = ["sparsity (of prunable groups)", "params after compaction", "LoRAPrune",
              "one-shot structured magnitude → LoRA"]  # fmt: skip
    return head + "\n\n" + table(header, rows)


def loraprune_breakdown(res: Results) -> str:
    """Per-phase CPU time of one LoRAPrune step vs plain LoRA (``breakdown`` key of loraprune.json, ``--profile``)."""
    lp = res.get("loraprune")
    if not lp:
        return missing("loraprune", "python benchmarks/loraprune.py --profile")
    if "breakdown" not in lp:
        return (
            "**not yet measured** — `benchmarks/results/loraprune.json` has no `breakdown` key; "
            "`python benchmarks/loraprune.py --profile` adds it."
        )
    b = lp["breakdown"]
    lo, pr = b["phases"]["lora"], b["phases"]["loraprune"]
    rows = []
    for phase, r in pr.items():
        base = lo.get(phase)
        rows.append([phase.replace("_", " "), f"{base['cpu_s']:.3f} s" if base else "–", f"{r['cpu_s']:.3f} s",
                     f"{b['cpu_share'][phase]:.1%}"])  # fmt: skip
    prof = b["profiler"]
    cb = b.get("callback_cpu_s_per_step", {})
    s = b["settings"]
    head = (
        f"Run: {run_note(lp)}. Plain loop, batch {s['batch']} × {s['seqlen']}, {s['steps'] - 1} timed steps per run, "
        f"runs in the order {s['order']}; median CPU time per step and phase. LoRAPrune step ÷ LoRA step (CPU): "
        f"**{x(b['loraprune_vs_lora_step_cpu'], 3)}**; importance ÷ (forward + backward): "
        f"{b['importance_vs_forward_backward_cpu']:.1%}; mask update ÷ (forward + backward): "
        f"{b['mask_update_vs_forward_backward_cpu']:.1%}. torch.profiler: the importance pass runs "
        f"{prof['importance']['ops']} ops ({prof['importance']['self_cpu_ms']:.0f} ms self CPU) against "
        f"{prof['forward_backward']['ops']} ops ({prof['forward_backward']['self_cpu_ms']:.0f} ms) for one forward + "
        f"backward. PruneCallback inside a Trainer run: "
        + ", ".join(f"{ev} {v * 1e3:.1f} ms" for ev, v in cb.items() if v >= 5e-5)
        + " per step."
    )
    return head + "\n\n" + table(["phase", "LoRA CPU", "LoRAPrune CPU", "share of the LoRAPrune step"], rows)


def distill_throughput(res: Results) -> str:
    d = res.get("distill")
    if not d:
        return missing("distill", "make bench")
    tp = d["throughput"]
    rows = [
        ["per-sample `generate` loop", f"{tp['per_sample_rows_per_s']:.3f}", "1×"],
        [f"batched ({tp['batch_size']} per call, length-bucketed, left-padded)", f"{tp['batched_rows_per_s']:.3f}",
         f"{x(tp['speedup_wall'])}{spread(tp.get('speedup_wall_pairs'))} wall, {x(tp['speedup_cpu_time'])} CPU time"],
    ]  # fmt: skip
    head = (
        f"Run: {run_note(d)}. {tp['prompts']} math rewrite prompts (mean {tp['mean_prompt_tokens']:.0f} prompt "
        f"tokens), greedy, `max_new_tokens={tp['max_new_tokens']}`."
    )
    tail = (
        f"Outputs identical: {tp['identical_outputs']:.0%}. Goal {_distill_goal(tp)}. Decode step "
        f"{x(tp['decode_step_speedup_cpu_time'])} faster batched, prefill {x(tp['prefill_speedup_cpu_time'])} "
        "(CPU time)."
    )
    pair_rows = [
        ["whole generation, batched with the shared-prefix KV cache (headline)",
         pairs_cell(tp.get("speedup_wall_pairs")) if tp.get("speedup_wall_pairs")
         else f"{x(tp['speedup_wall'])} (no pairs recorded)", _distill_goal(tp)],
        ["alternative: whole generation, batched without the prefix cache",
         pairs_cell(tp.get("speedup_wall_no_prefix_cache_pairs")), "–"],
        ["prefill alone (one new token)", pairs_cell(tp.get("prefill_speedup_pairs")), "–"],
        ["decode (whole run minus prefill)", pairs_cell(tp.get("decode_speedup_pairs")), "–"],
    ]  # fmt: skip
    pairs = table(["per-sample loop ÷ batched, wall time (median of pairs)", "speedup", "goal"], pair_rows)
    return head + "\n\n" + table(["path", "rows/s", "speedup"], rows) + "\n\n" + tail + "\n\n" + pairs


def distill_quality(res: Results) -> str:
    d = res.get("distill")
    if not d:
        return missing("distill", "make bench")
    q = d["quality"]
    ld = q["layer_drop"]
    labels = {
        "teacher": f"teacher ({ld['num_blocks_before']} blocks)",
        "pruned": f"pruned, no fine-tuning ({ld['num_blocks_after']} blocks)",
        "sft_original": "+ SFT on original answers",
        "sft_distilled": "+ SFT on self-distilled answers",
    }
    rows = []
    for k, label in labels.items():
        r = q[k]
        ret = "—" if r.get("accuracy_retention") is None else f"{r['accuracy_retention']:.0%}"
        ppl = "–" if r.get("ppl") is None else f"{r['ppl']:.1f}"
        rows.append([label, f"{r['correct']}/{r['n']} = {r['accuracy']:.1%}", ret, ppl])
    head = (
        f"Run: {run_note(d)}. Blocks {', '.join(map(str, ld['removed']))} dropped; rewrites accepted {q['distill_stats']['accepted']}/"
        + (f"{q['distill_stats']['rows']}.")
    )
    return head + "\n\n" + table(["model", "held-out accuracy", "retention vs teacher", "Shakespeare ppl"], rows)


ADAPTER_LABELS = {
    "lora": "LoRA (peft)",
    "sparse_lora": "SparseLoRA (default, exact gradients)",
    "sparse_lora_lors": 'alternative: SparseLoRA `grad_mode="lors"`',
    "spp": "SPP (default, fused)",
    "spp_blockwise": 'alternative: SPP `forward_mode="blockwise"`',
}


def adapters_section(res: Results) -> str:
    a = res.get("adapters")
    if not a:
        return missing("adapters", "make bench")
    labels = ADAPTER_LABELS
    rows = []
    for name, r in a["adapters"].items():
        t, ts = _time_ratio(r)
        rows.append([labels.get(name, name), f"{r['step_s']:.2f} s ({x(t)}{ts})",
                     f"{r['peak_rss_mb'] / 1024:.2f} GB ({x(r['peak_rss_ratio'])})",
                     f"{r['training_mb'] / 1024:.2f} GB ({x(r['training_mem_ratio'])})", f"{r['ppl_merged']:.2f}",
                     f"{r['sparsity_after_merge']:.4f}"])  # fmt: skip
    head = (
        f"Run: {run_note(a)}. SmolLM2-135M, Wanda 2:4 (sparsity {a['sparsity_pruned']:.4f}), batch {a['batch'][0]} × "
        f"{a['batch'][1]}, {a['dtype']}, {a['threads']} threads, rank {a['rank']} for the LoRA types, {a['steps']} "
        f"steps. Held-out ppl: dense {a['ppl_dense']:.2f}, pruned {a['ppl_pruned']:.2f}. Ratios are to plain LoRA; "
        "training memory = peak RSS minus the RSS with the model loaded, each adapter in its own process. Goals: step "
        "time ≤ 1.15×, memory ≤ 1.10×."
    )
    header = ["adapter", "step time (÷ LoRA)", "peak RSS (÷ LoRA)", "training memory (÷ LoRA)",
              f"ppl after {a['steps']} steps (merged)", "sparsity after merge"]  # fmt: skip
    ad = a["adapters"]
    verdicts = []
    for k in ("sparse_lora", "spp"):
        if k in ad:
            verdicts.append(f"{labels[k]}: time {goal(ad[k]['time_ratio'], '≤', '1.15')}, memory "
                            f"{goal(ad[k]['training_mem_ratio'], '≤', '1.10')}")  # fmt: skip
    return head + "\n\n" + table(header, rows) + "\n\n" + "; ".join(verdicts) + ".\n\n" + adapter_profile(a)


def adapter_profile(a: dict) -> str:
    """The exact mode's floor and the per-phase breakdown (``profile`` key of adapters*.json)."""
    prof = a.get("profile")
    if not prof:
        return (
            "Per-phase breakdown and the exact mode's floor: **not measured** in this run (the results file predates "
            "`benchmarks/adapters.py`'s `profile` key)."
        )
    sm, eg = prof["summary"], prof["extra_gemm"]
    rows = []
    for name, r in prof["phases"].items():
        rows.append([ADAPTER_LABELS.get(name, name)]
                    + [f"{r[f'{ph}_s']:.2f} s ({x(r[f'{ph}_vs_lora'])})" for ph in ("forward", "backward", "optimizer")]
                    + [f"{r['backward_cpu_s']:.2f} s ({x(r['backward_cpu_vs_lora'])})"])  # fmt: skip
    bp = prof.get("backward_profiler", {}).get("backward_cpu_vs_lora", {})
    profiler = ", ".join(f"{ADAPTER_LABELS.get(n, n)} {x(v)}" for n, v in bp.items() if n != "lora")
    head = (
        f"The exact mode's floor: it computes one more dense GEMM per layer than LoRA, `Gᵀ X` for "
        f"`M ⊙ Gᵀ X` ({eg['layers']} layers, {eg['tokens']} tokens, {eg['dtype']}: {eg['extra_gemm_s']:.2f} s per step,"
        f" the size of the layers' forward GEMMs, {eg['base_forward_gemm_s']:.2f} s). LoRA's step plus those GEMMs = "
        f"**{x(sm['exact_floor_ratio'])}** LoRA's step ({x(sm['exact_floor_ratio_cpu'])} in CPU time); the exact "
        f"mode measured {x(sm.get('exact_step_vs_lora'))} in the same rounds, its backward "
        f"{sm.get('exact_backward_minus_lora_s', float('nan')):.2f} s longer than LoRA's "
        f"({x(sm.get('exact_backward_excess_over_extra_gemm'))} the extra GEMM; in CPU time "
        f"{x(sm.get('exact_backward_excess_over_extra_gemm_cpu'))})."
    )
    if sm.get("half_split_floor_ratio") is not None:
        head += (
            f" In {eg['dtype']} the forward and input-gradient GEMMs also run over `[W | ΔW]` (twice the inner "
            f"dimension, so the update is never rounded into W): LoRA's step plus those and the extra GEMM = "
            f"**{x(sm['half_split_floor_ratio'])}** ({x(sm['half_split_floor_ratio_cpu'])} in CPU time)."
        )
    if sm.get("exact_minus_lors_s") is not None:
        head += (
            f' Exact minus `grad_mode="lors"` (the same forward and input gradient): '
            f"{sm['exact_minus_lors_s']:.2f} s per step, {x(sm['exact_minus_lors_over_extra_gemm'])} the extra GEMM."
        )
    if profiler:
        head += f" Backward CPU time under torch.profiler ÷ LoRA's: {profiler}."
    header = ["adapter", "forward (÷ LoRA)", "backward (÷ LoRA)", "optimizer (÷ LoRA)", "backward CPU (÷ LoRA)"]
    return head + "\n\n" + table(header, rows)


def adapters_bf16_section(res: Results) -> str:
    a = res.get("adapters_bf16")
    if not a:
        return missing("adapters_bf16", "python benchmarks/adapters.py --dtype bf16 (make bench)")
    rows = []
    for name, r in a["adapters"].items():
        old = r.get("vs_legacy")
        rows.append([ADAPTER_LABELS.get(name, name), f"{r['step_s']:.2f} s",
                     "1×" if name == "lora" else pairs_cell(r.get("time_ratio_pairs")),
                     "–" if not old else f"{old['legacy_step_s']:.2f} s",
                     "–" if not old else pairs_cell(old)])  # fmt: skip
    head = (
        f"Run: {run_note(a)}. The same model in {a['dtype']} (adapters in fp32, as peft keeps them), batch "
        f"{a['batch'][0]} × {a['batch'][1]}, {a['threads']} threads, {a['steps']} steps, every adapter and its copy "
        "on the old fused path (`x · bf16(W + ΔW)ᵀ`, which rounded away updates below half an ulp of the weight) "
        "trained side by side in one rotation; ratios are medians of per-round pairs."
    )
    header = ["adapter", "step time", "÷ LoRA (pairs)", "old rounded fused path: step time",
              "current ÷ old path (pairs)"]  # fmt: skip
    ad = a["adapters"]
    verdicts = []
    for k in ("sparse_lora", "spp"):
        if k in ad:
            verdicts.append(f"{ADAPTER_LABELS[k]} in {a['dtype']}: time {goal(ad[k]['time_ratio'], '≤', '1.15')}")
    return head + "\n\n" + table(header, rows) + "\n\n" + "; ".join(verdicts) + ".\n\n" + adapter_profile(a)


def qtuning_section(res: Results) -> str:
    q = res.get("qtuning")
    if not q:
        return missing("qtuning", "make bench")
    pt = _qtuning_paired(q)
    cpu = q["paired_timing"].get("cpu") or paired_from_list([p["cpu_ratio"] for p in q["paired_timing"]["pairs"]])
    s = q["settings"]
    rows = [
        ["Q-Tuning ÷ full-data SFT, wall time, paired median (headline)", f"{x(pt['median'])}{spread(pt)}",
         goal(pt["median"], "≤", "0.5")],
        ["Q-Tuning ÷ full-data SFT, CPU time, paired median", f"{x(cpu['median'])}{spread(cpu)}", "–"],
        ["Q-Tuning ÷ its floor (no-grad scoring of every sample + SFT on the kept share), wall time, paired median",
         pairs_cell(q["paired_timing"].get("vs_floor")), _paired_goal(q["paired_timing"].get("vs_floor"), "≤", "1.10")],
        ["the floor ÷ full-data SFT, wall time, paired median", pairs_cell(q["paired_timing"].get("floor_vs_full")),
         "–"],
        ["alternative: one full epoch each (a single pair), wall time", x(q["ratios_vs_full"]["qtuning_wall"]), "–"],
        ["share of Q-Tuning's wall time in its scoring forward (paired median)",
         f"{q['paired_timing']['median_scoring_share']:.0%}", "–"],
    ]  # fmt: skip
    r = q["runs"]
    loss_rows = [["base (no training)", "–", "–", f"{q['heldout_loss_base']:.4f}"]]
    for k in ("full", "qtuning_25x50", "random_25%_same_steps", "random_12.5%", "qtuning_25x50_keep_low"):
        if k in r:
            loss_rows.append([k, str(r[k]["samples_in_epoch"]), str(r[k]["optimizer_steps"]),
                              f"{r[k]['heldout_loss']:.4f}"])  # fmt: skip
    head = (
        f"Run: {run_note(q)}. {s['n_train']} training samples, batch {s['batch_size']}, {s['pairs']} timing pairs of "
        f"{s['pair_steps']} steps (alternating order), {s['threads']} threads."
    )
    return (
        head
        + "\n\n"
        + table(["ratio", "measured", "goal"], rows)
        + "\n\n"
        + table(["run", "samples in epoch", "optimizer steps", "held-out loss"], loss_rows)
    )


# raw outputs of GPU runs that wrote no JSON or are probes (benchmarks/results/gpu_runs/): read, never typed
GPU_ROWMAJOR_LOG = "gpu_runs/2026-11-30_440e64b/bench.log"
GPU_PROBES = "gpu_runs/2026-11-30_2b38296_probes/diag.json"
_GPU_LOG_ROW = re.compile(
    r"^\s*(?P<d_in>\d+)→(?P<d_out>\d+)\s+(?P<tokens>\d+)\s+(?P<dtype>bf16|fp16)\s+(?P<t>[T-])\s+(?P<backend>\S+)\s+"
    r"(?P<fwd>[\d.]+)\s+(?P<fwd_bwd>[\d.]+)(?:\s+(?P<kernel>[\d.]+|nan))?\s*$"
)


def parse_gpu_log(text: str) -> list[dict]:
    """The per-configuration lines ``sparse24_gpu.py`` prints (shape, tokens, dtype, mask, backend, ratios)."""
    rows = []
    for line in text.splitlines():
        m = _GPU_LOG_ROW.match(line)
        if m:
            k = m["kernel"]
            rows.append({"d_in": int(m["d_in"]), "d_out": int(m["d_out"]), "tokens": int(m["tokens"]),
                         "dtype": m["dtype"], "transposable": m["t"] == "T", "backend": m["backend"],
                         "fwd_speedup": float(m["fwd"]), "fwd_bwd_speedup": float(m["fwd_bwd"]),
                         "kernel_only_fwd_speedup": None if k in (None, "nan") else float(k)})  # fmt: skip
    return rows


def _gpu_config_table(rows: list[dict], kernel: bool) -> str:
    head = ["shape (in→out)", "tokens", "dtype", "mask", "forward", "forward + ∂x"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([f"{r['d_in']}→{r['d_out']}", str(r["tokens"]), r.get("dtype", "?"), "", "failed", r["error"]])
            continue
        line = [f"{r['d_in']}→{r['d_out']}", str(r["tokens"]), r.get("dtype", "bf16"),
                "transposable" if r["transposable"] else "row-wise", x(r["fwd_speedup"]), x(r["fwd_bwd_speedup"])]  # fmt: skip
        if kernel:
            line.append(x(r.get("kernel_only_fwd_speedup")))
        body.append(line)
    return table([*head, "bare kernel, forward"] if kernel else head, body)


def _sft_pairs(g: dict) -> str:
    """Interleaved SFT pairs of a sparse24_gpu run: recorded in the result, or (older files) its --sft-steps."""
    if (g.get("sft") or {}).get("pairs"):
        return str(g["sft"]["pairs"])
    argv = g.get("stamp", {}).get("argv") or []
    return argv[argv.index("--sft-steps") + 1] if "--sft-steps" in argv[:-1] else "?"


def sparse24_gpu_section(res: Results) -> str:
    g = res.get("sparse24_gpu")
    if not g:
        rows = [
            ["linear forward, 4096→11008 / 4096→14336, 16384 tokens", "≥ 1.6× (limit 2×)", "**not yet measured**"],
            ["linear forward + input gradient, same shapes, transposable mask", "–", "**not yet measured**"],
            ["one SFT step, SmolLM2-135M 2:4 + SparseLoRA, batch 8 × 512, sparse vs dense", "≥ 1.2×",
             "**not yet measured**"],
        ]  # fmt: skip
        return table(["measurement (bf16, dense ÷ sparse time)", "goal", "result"], rows)
    s = g["summary"]
    env = g["env"]
    lin = g["linear"]
    fb = [r["fwd_bwd_speedup"] for r in lin if r.get("tokens") == 16384 and r.get("transposable") and "error" not in r
          and r.get("dtype", "bf16") == "bf16"]  # fmt: skip
    fwd = ", ".join(f"{k}: {x(v)}" for k, v in s.get("goal_fwd_speedups", {}).items()) or "–"
    sft = g.get("sft") or {}
    log_rows = res.get("sparse24_gpu_rowmajor_log") or []
    goal_log = [r for r in log_rows if r["tokens"] == 16384 and not r["transposable"] and r["dtype"] == "bf16"]
    rows = [
        ["linear forward, 4096→11008 / 4096→14336, 16384 tokens (run A: output copied to row-major)",
         _gpu_goal(s.get("goal_fwd_1.6x_met"), 1.6), fwd],
    ]  # fmt: skip
    if goal_log:
        worst = min(r["fwd_speedup"] for r in goal_log)
        rows.append(["the same, run B (bf16 written row-major by cuSPARSELt, searched algorithm; the code at HEAD)",
                     f"≥ 1.6× — {'met' if worst >= 1.6 else '**missed**'}",
                     ", ".join(f"{r['d_in']}->{r['d_out']}: {x(r['fwd_speedup'])}" for r in goal_log)])  # fmt: skip
    rows += [
        ["linear forward + input gradient, 16384 tokens, transposable mask, bf16 (run A, best / worst shape)", "–",
         f"{x(max(fb))} / {x(min(fb))}" if fb else "–"],
        ["one SFT step, SmolLM2-135M architecture 2:4 + SparseLoRA, batch 8 × 512, sparse vs dense (run A)",
         _gpu_goal(s.get("goal_sft_1.2x_met"), 1.2),
         f"{x(s.get('sft_step_speedup'))} ({x((sft.get('step_speedup_min_max') or [None])[0])}–"
         f"{x((sft.get('step_speedup_min_max') or [None, None])[1])} over {_sft_pairs(g)} pairs)"
         if sft else "–"],
    ]  # fmt: skip
    head = (
        f"Run A: `benchmarks/gpu_check.sh` at {run_note(g)}; {env['gpu']} ({env['capability']}), torch {env['torch']}, "
        f"CUDA {env['cuda']}, cuSPARSELt {env['cusparselt_version']}."
    )
    parts = [head, table(["measurement (dense ÷ sparse time)", "goal", "result"], rows)]
    if sft:
        prof = sft.get("profile_top_kernels") or {}
        dev = {k: v[0]["total_self_ms_per_step"] for k, v in prof.items() if v}
        line = (
            f"SFT step (run A): dense {sft['dense_step_ms']:.0f} ms, sparse {sft['sparse_step_ms']:.0f} ms per step "
            f"({sft['weights']})"
        )
        if dev:
            line += f"; GPU busy time per step (profiler): dense {dev.get('dense', 0):.0f} ms, sparse {dev.get('sparse', 0):.0f} ms"
        parts.append(line + ".")
    for c in g.get("cutlass_probe") or []:
        outcome = "runs" if c["runs"] else f"fails: `{c['error']}`"
        parts.append(f"PyTorch's CUTLASS 2:4 GEMM on this GPU, {c['dtype']}: {outcome}.")
    parts.append("Every configuration of run A (layer ÷ dense `nn.Linear`, back-to-back calls):\n\n"
                 + _gpu_config_table(lin, kernel=False))  # fmt: skip
    if log_rows:
        parts.append(f"Run B (`benchmarks/results/{GPU_ROWMAJOR_LOG}`, the code at HEAD for bf16; its SFT step hit "
                     "the run's time limit before the JSON was written, so only this printed table exists):\n\n"
                     + _gpu_config_table(log_rows, kernel=True))  # fmt: skip
    probes = (res.get("sparse24_gpu_probes") or {}).get("probes") or []
    if probes:
        prow = []
        for r in probes:
            prow.append([f"{r['d_in']}→{r['d_out']}", str(r["tokens"]), "bf16" if "bfloat16" in r["dtype"] else "fp16",
                         f"{r['dense_ms']:.3f}", x(r.get("ours_x")), x(r.get("ours_graph_x")), x(r.get("raw_alg0_x")),
                         x(r.get("raw_best_x")), x(r.get("raw_best_T_x")), x(r.get("raw_alg0_T_x"))])  # fmt: skip
        parts.append(
            f"Kernel probes (`benchmarks/sparse24_gpu_probes.py`, `benchmarks/results/{GPU_PROBES}`; the layer then "
            "returned PyTorch's column-major view, no copy), speed ÷ dense:\n\n"
            + table(["shape", "tokens", "dtype", "dense ms", "layer", "layer, CUDA graph", "bare kernel",
                     "searched algorithm", "searched + fused transpose", "fused transpose, default algorithm"], prow)
        )  # fmt: skip
    return "\n\n".join(parts)


def distributed_section(res: Results) -> str:
    """Peak RSS per rank of LoRAPrune and SparseLoRA at 1 process, 1 FSDP2 rank and 2 FSDP2 ranks."""
    d = res.get("distributed")
    if not d:
        return missing("distributed", "python benchmarks/distributed.py")
    s = d["settings"]
    labels = {"single": "1 process, unsharded", "fsdp2x1": "1 rank, fully_shard", "fsdp2x2": "2 ranks, fully_shard"}
    rows = []
    for config, layouts in d["memory"].items():
        single = layouts["single"][0]["peak_rss_mb"]
        for layout, ranks in layouts.items():
            peak = max(r["peak_rss_mb"] for r in ranks)
            rows.append([
                "LoRAPrune" if config == "loraprune" else "SparseLoRA", labels.get(layout, layout),
                " / ".join(f"{r['peak_rss_mb']:.0f}" for r in ranks),
                " / ".join(f"{r['model_rss_mb']:.0f}" for r in ranks),
                " / ".join(f"{r['training_mb']:.0f}" for r in ranks),
                "1×" if layout == "single" else x(peak / single),
            ])  # fmt: skip
    head = (
        f"Run: {run_note(d)}. SmolLM2-135M fp32, global batch {s['batch']} × {s['seqlen']} tokens split over the "
        f"ranks, {s['steps']} steps, {s['threads']} threads per layout. MiB per rank (rank 0 / rank 1); peak = the "
        "resident high-water mark from the sharded, paged-in model to the end of training (the whole-checkpoint "
        "load every rank does before `fully_shard` is not counted); it includes the Python/torch runtime "
        f"(≈ {d['memory']['loraprune']['single'][0]['runtime_rss_mb']:.0f} MiB per process), which no sharding "
        "reduces."
    )
    load = [r.get("load_peak_rss_mb") for ls in d["memory"].values() for rs in ls.values() for r in rs]
    if all(v is not None for v in load):
        head += (
            f" Before sharding every rank holds the whole fp32 checkpoint once: up to {max(load):.0f} MiB while "
            "loading (not in the table)."
        )
    header = ["method", "layout", "peak RSS", "RSS with the model", "training (peak − model)",
              "largest rank ÷ 1 process (peak)"]  # fmt: skip
    return head + "\n\n" + table(header, rows)


# ----------------------------------------------------------------------------------- quality evidence (issue #18)

QUALITY_SECTIONS = {  # report section → the comparisons of benchmarks/quality.py it shows
    "quality-oneshot": ("oneshot", "owl"),
    "quality-loraprune": ("loraprune",),
    "quality-recovery": ("recovery",),
    "quality-qtuning": ("qtuning",),
    "quality-distill": ("distill",),
    "quality-sste": ("sste",),
}


def _ci(mean: float, lo: float, hi: float, digits: int = 2, signed: bool = False) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


QUALITY_ARM_COLUMNS = {  # optional per-arm fields of quality.json → (column, cell)
    "gap_recovered": ("dense→pruned gap recovered [95 % CI]", lambda v: _ci(v["mean"], v["lo"], v["hi"])),
    "sparsity_after_merge": ("sparsity of the pruned layers", lambda v: f"{v:.1%}"),
    "trainable_params": ("trainable parameters", lambda v: f"{v / 1e6:.2f} M"),
    "params": ("parameters after compact()", lambda v: f"{v / 1e6:.1f} M"),
}


DENSE_LABELS = {"qtuning": "base model (no fine-tuning)"}  # the ``dense`` record where it is not an unpruned model
NLL_SHOWN = {"qtuning"}  # comparisons whose arms show the NLL itself (the unit of their verdicts and attribution)


def _quality_arm_cell(r: dict, nll: bool = False) -> str:
    """Perplexity with its interval when the arm is an NLL (has ``ppl``) and ``nll`` is false, else the metric's
    mean and interval."""
    if "ppl" in r and not nll:
        return _ci(r["ppl"], r["ppl_lo"], r["ppl_hi"])
    return _ci(r["mean"], r["lo"], r["hi"], 4)


def quality_memory(m: dict) -> str:
    """LoRAPrune's peak-memory record (one fresh process per importance mode)."""
    header = ["importance", "peak RSS", "RSS with the model", "training (peak − model)"]
    rows = [
        [k, f"{m[k]['peak_rss_mb']:.0f} MB", f"{m[k]['model_rss_mb']:.0f} MB", f"{m[k]['training_mb']:.0f} MB"]
        for k in ("loraprune", "grad")
        if k in m
    ]
    if all(m.get(k, {}).get("importance_grad_mb") is not None for k in ("loraprune", "grad")):
        header.append("gradient state the importance reads")  # the paper's memory claim, free of activations
        for row, k in zip(rows, ("loraprune", "grad")):
            row.append(f"{m[k]['importance_grad_mb']:.1f} MB")
    if "error" in m:
        return f"Peak memory: not measured (the memory process failed: {m['error'][-200:]})."
    ratios = "; ".join(f"{k}: {v:.2f}×" for k, v in m.get("ratios", {}).items())
    shape = m.get("shape", ["?", "?"])
    return (
        f"Peak memory of a 2-step run at batch {shape[0]} × {shape[1]} (`loraprune` = importance from LoRA, "
        f"`grad` = from the base-weight gradients; {ratios}):\n\n" + table(header, rows)
    )


def quality_comparison(q: dict, name: str) -> str:
    """One comparison of quality.json: its settings, arms (ppl or metric with 95 % interval), the paper's claim
    quoted directly above the paired verdicts, and the comparison's own extra table (``QUALITY_EXTRAS``)."""
    c = (q.get("comparisons") or {}).get(name)
    if not c:
        return f"*{name}*: not measured yet — run `make bench`."
    s = c.get("settings", {})
    windows = c.get("windows_are") or f"{s.get('eval_windows')} held-out windows of {s.get('eval_seqlen')} tokens"
    head = (
        f"**{name}** — {s.get('seeds')} seed(s) × {windows}; mean and 95 % interval by bootstrap over seeds × "
        f"windows. Metric: {c.get('metric', '')}."
    )
    for key in ("task", "budget"):
        if c.get(key):
            head += f"\n\n{key.capitalize()}: {c[key]}."
    d = c.get("dense")
    arms = c["arms"]
    extra = [k for k in QUALITY_ARM_COLUMNS if any(k in r for r in arms.values())]
    label = DENSE_LABELS.get(name, "dense (unpruned)")
    nll = name in NLL_SHOWN
    rows = [[label, _quality_arm_cell(d, nll), "–"] + ["–"] * len(extra)] if d else []
    for arm, r in arms.items():
        cells = [QUALITY_ARM_COLUMNS[k][1](r[k]) if k in r else "–" for k in extra]
        rows.append([arm, _quality_arm_cell(r, nll), f"{r['seeds']} × {r['windows']}", *cells])
    ppl = all("ppl" in r for r in arms.values())
    value = "mean NLL [95 % CI]" if nll and ppl else "perplexity [95 % CI]" if ppl else "value [95 % CI]"
    header = ["arm", value, "seeds × windows"] + [QUALITY_ARM_COLUMNS[k][0] for k in extra]
    verdicts = [
        [key, _ci(v["mean"], v["lo"], v["hi"], 4, signed=True), v["verdict"]] for key, v in c["comparisons"].items()
    ]
    parts = [
        head,
        table(header, rows),
        f"Verdicts (paired, method − baseline) against the paper's claim: *{c['claim']}*",
        table(["comparison (method − baseline)", "Δ of the metric [95 % CI]", "verdict"], verdicts),
    ]
    if c.get("memory"):
        parts.append(quality_memory(c["memory"]))
    if name in QUALITY_EXTRAS:
        parts.append(QUALITY_EXTRAS[name](c))
    return "\n\n".join(p for p in parts if p)


# Q-Tuning's ablations as a decomposition of its gap to random selection: the differences of arm means add up
# exactly (Q-Tuning − random = (sample-only − random) + (Q-Tuning − sample-only)); the paired interval is shown
# where quality.json holds one for that contrast.
QTUNING_CONTRASTS = (  # (what it isolates, method arm, baseline arm); each "of which" pair adds up to the row above
    ("Q-Tuning vs full data", "Q-Tuning 25%×50% keep high", "full data"),
    ("… of which: a quarter of the samples per step, chosen at random", "random 25% same steps", "full data"),
    ("… of which: Q-Tuning's choice instead of random", "Q-Tuning 25%×50% keep high", "random 25% same steps"),
    ("… … of which: sample selection (EU-plane triage, all tokens kept)", "sample-only 25%×100%",
     "random 25% same steps"),
    ("… … of which: token pruning inside the selected samples", "Q-Tuning 25%×50% keep high", "sample-only 25%×100%"),
    ("token pruning alone (every sample kept)", "token-only 100%×50%", "full data"),
    ("token direction: keep high (this library's default) vs keep low", "Q-Tuning 25%×50% keep high",
     "Q-Tuning 25%×50% keep low"),
)  # fmt: skip


def _paired_for(c: dict, method: str, baseline: str) -> dict | None:
    """The paired comparison of quality.json whose arms are ``method`` and ``baseline``, matched by its key
    ("<method> vs <baseline>", the arm names as quality.py abbreviates them)."""
    short = {
        "Q-Tuning 25%×50% keep high": "Q-Tuning (keep high)",
        "Q-Tuning 25%×50% keep low": "Q-Tuning keep low",
        "sample-only 25%×100%": "sample-only",
        "token-only 100%×50%": "token-only",
    }
    return c["comparisons"].get(f"{short.get(method, method)} vs {baseline}")


def qtuning_attribution(c: dict) -> str:
    """Which part of Q-Tuning makes its difference: the contrasts of ``QTUNING_CONTRASTS`` from the arm means, with
    the paired interval and verdict where the results file has that pair."""
    arms = c["arms"]
    rows = []
    for what, m, b in QTUNING_CONTRASTS:
        if m not in arms or b not in arms:
            continue
        p = _paired_for(c, m, b)
        delta = arms[m]["mean"] - arms[b]["mean"]
        rows.append([what, f"{m} − {b}", f"{delta:+.4f}",
                     _ci(p["mean"], p["lo"], p["hi"], 4, signed=True) if p else "– (no paired interval recorded)",
                     p["verdict"] if p else "–"])  # fmt: skip
    if not rows:
        return ""
    return (
        "Attribution (differences of the arm means above, held-out response NLL; negative = the first arm is "
        'better; each pair of "of which" rows adds up to the row above it; the paired interval and verdict where the '
        "results file holds that pair):\n\n"
        + table(["effect", "arms (first − second)", "Δ mean NLL", "paired Δ [95 % CI]", "verdict"], rows)
    )


ISSUE_ONESHOT_GRID = ((32, 512), (128, 512), (32, 2048), (128, 2048))  # issue #18 item 6: nsamples × seqlen


def _grid(points) -> str:
    return ", ".join(f"{n} × {L}" for n, L in points)


def oneshot_grid_note(c: dict) -> str:
    """The calibration grid this run covers (from its settings), the points of the issue's grid it leaves out and
    their size relative to the largest point run, this comparison's measured minutes, and the command for the rest."""
    st = c.get("settings", {})
    grid = [tuple(g) for g in st.get("oneshot_grid", [])]
    if not grid:
        return ""
    missing_pts = [g for g in ISSUE_ONESHOT_GRID if g not in grid]
    issue = "the issue's grid (32, 128 samples × 512, 2048 tokens)"
    text = (
        f"Calibration grid of this run (nsamples × seqlen, from its settings): {_grid(grid)}, i.e. "
        f"{', '.join(f'{n * L:,}' for n, L in grid)} calibration tokens per prune; the library's default is 128 × 512."
    )
    if not missing_pts:
        return text + f" It covers {issue}."
    big = max(grid, key=lambda g: g[0] * g[1])
    ratios = ", ".join(f"{n * L / (big[0] * big[1]):g}×" for n, L in missing_pts)
    minutes = f" This comparison took {c['minutes']:.0f} min on the run's machine" if "minutes" in c else ""
    text += (
        f" **Not run**: {_grid(missing_pts)} of {issue}, for their cost on 2 CPU cores: they are {ratios} the "
        f"calibration tokens of the largest point run ({big[0]} × {big[1]}), and every Wanda/SparseGPT prune passes "
        "all of them through every block (at least linear in tokens; attention grows faster with seqlen), for "
        f"{len(missing_pts)} more points × 4 method/pattern arms × {st.get('seeds')} seed(s).{minutes} "
        "(`python benchmarks/quality.py --help` prints the script's estimate for the larger points)."
    )
    full = ",".join(f"{n}x{L}" for n, L in ISSUE_ONESHOT_GRID)
    return (
        text
        + f" The full grid: `python benchmarks/quality.py --only oneshot --oneshot-grid {full}` (the other comparisons "
        "already in the results file are kept)."
    )


QUALITY_EXTRAS: dict[str, Callable[[dict], str]] = {
    "qtuning": qtuning_attribution,
    "oneshot": oneshot_grid_note,
}


# sections whose comparisons do not use quality.json's model (SmolLM2-135M): the model named in their task line
QUALITY_SECTION_MODEL = {"quality-sste": "a tiny llama trained from scratch (task line below)"}


def quality_run_note(q: dict, names: tuple[str, ...]) -> str:
    """The commit and start load of the comparisons shown: quality.json accumulates comparisons over ``--only``
    runs, so its file stamp names only the last run; each comparison keeps its own ``run`` record."""
    runs = [q.get("comparisons", {}).get(n, {}).get("run") for n in names if n in q.get("comparisons", {})]
    if not runs or not all(runs):
        return run_note(q)
    commits = sorted({(r.get("git_commit") or "unknown")[:7] + ("+dirty" if r.get("git_dirty") else "") for r in runs})
    loads = [r["load_1min_start"] for r in runs if r.get("load_1min_start") is not None]
    load = f"load at start {max(loads):.1f}" if loads else "load not recorded for this comparison"
    return f"commit {', '.join(commits)}, {q.get('stamp', {}).get('threads')} threads, {load} (quality, not timing)"


def quality_section(section: str) -> Callable[[Results], str]:
    def render_section(res: Results) -> str:
        q = res.get("quality")
        names = QUALITY_SECTIONS[section]
        if not q:
            return "; ".join(f"*{n}*" for n in names) + ": not measured yet — run `make bench`."
        model = QUALITY_SECTION_MODEL.get(section, q.get("model", ""))
        parts = [f"Run: {quality_run_note(q, names)}. Model: {model}."]
        parts += [quality_comparison(q, n) for n in names]
        return "\n\n".join(parts)

    render_section.__name__ = section.replace("-", "_")
    return render_section


SECTIONS: dict[str, Callable[[Results], str]] = {
    **{name: quality_section(name) for name in QUALITY_SECTIONS},
    "readme-benchmarks": readme_benchmarks,
    "adapters": adapters_section,
    "adapters-bf16": adapters_bf16_section,
    "loraprune-cost": loraprune_cost,
    "loraprune-quality": loraprune_quality,
    "loraprune-breakdown": loraprune_breakdown,
    "distill-throughput": distill_throughput,
    "distill-quality": distill_quality,
    "qtuning": qtuning_section,
    "sparse24-gpu": sparse24_gpu_section,
    "distributed": distributed_section,
}
BENCHMARKS = (
    "oneshot",
    "adapters",
    "adapters_bf16",
    "loraprune",
    "qtuning",
    "distill",
    "sparse24_gpu",
    "distributed",
    "quality",
)


# ----------------------------------------------------------------------------------------------------------- driver


def load_results(results_dir: Path) -> Results:
    out: Results = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    log = results_dir / GPU_ROWMAJOR_LOG
    out["sparse24_gpu_rowmajor_log"] = parse_gpu_log(log.read_text()) if log.exists() else None  # type: ignore[assignment]
    probes = results_dir / GPU_PROBES
    out["sparse24_gpu_probes"] = json.loads(probes.read_text()) if probes.exists() else None
    return out


def render(text: str, results: Results, where: str = "<doc>") -> str:
    """``text`` with every marked section regenerated."""

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in SECTIONS:
            raise ValueError(f"{where}: unknown report section {name!r}; known: {sorted(SECTIONS)}")
        return f"<!-- report:{name} -->\n{SECTIONS[name](results).rstrip()}\n<!-- /report:{name} -->"

    opened = re.findall(r"<!-- report:([a-z0-9-]+) -->", text)
    closed = re.findall(r"<!-- /report:([a-z0-9-]+) -->", text)
    if sorted(opened) != sorted(closed):
        raise ValueError(f"{where}: unbalanced report markers: opened {opened}, closed {closed}")
    return MARKER.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if any doc is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root holding the docs")
    ap.add_argument("--results", type=Path, default=None, help="results folder (default: <root>/benchmarks/results)")
    args = ap.parse_args(argv)
    results = load_results(args.results or args.root / "benchmarks" / "results")
    stale = 0
    for rel in DOCS:
        path = args.root / rel
        if not path.exists():
            continue
        old = path.read_text()
        new = render(old, results, rel)
        if new == old:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (from results)")
            )
        else:
            path.write_text(new)
            print(f"updated {rel}")
    if stale:
        print(f"\n{stale} doc(s) disagree with benchmarks/results; run `python benchmarks/report.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
