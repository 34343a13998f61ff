"""The LoRAPrune step breakdown: benchmarks/loraprune.py's phase loop and op profile, and its generated doc section."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "callbacks"))
import loraprune as bench  # noqa: E402
import report  # noqa: E402
from prune_testlib import collate, loraprune_model, token_rows  # noqa: E402


def test_phase_loop_times_every_phase_and_the_importance_runs_few_ops():
    model = loraprune_model(target_sparsity=0.5, prune_every=1, warmup=0.0)
    model.base_model.prepare_pruning(total_steps=3)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-3)
    batches = [collate(token_rows(2, seed=s)) for s in range(3)]
    times = bench._phase_loop(model, opt, batches, pruning=True)
    assert set(times) == set(bench.PHASES) and all(len(v) == 3 for v in times.values())
    assert all(w >= 0 and c >= 0 for v in times.values() for w, c in v)
    assert model.base_model.pruner().last_step == 3  # the loop pruned on the schedule
    model(**batches[0]).loss.backward()
    pruner = model.base_model.pruner()
    prof = bench._op_profile(pruner._accumulate)
    # 2 prunable blocks × 7 layers: one fused scoring per layer (one mm and one addmm each), not a loop of row chunks
    assert prof["counts"]["aten::mm"] == prof["counts"]["aten::addmm"] == 14
    assert prof["ops"] < 14 * 60  # about 45 ops per layer, bookkeeping included: no per-layer Python loops


def test_breakdown_section_renders_the_phases_and_says_when_not_measured():
    phases = {p: {"wall_s": 1.0, "cpu_s": 1.0} for p in ("forward", "backward", "optimizer", "zero_grad")}
    lp = {**phases, "importance": {"wall_s": 0.1, "cpu_s": 0.1}, "mask_update": {"wall_s": 0.01, "cpu_s": 0.01}}
    total = sum(v["cpu_s"] for v in lp.values())
    breakdown = {
        "phases": {"lora": phases, "loraprune": lp},
        "settings": {"batch": 4, "seqlen": 256, "steps": 3, "threads": 2, "order": "lora, loraprune, loraprune, lora"},
        "cpu_share": {p: v["cpu_s"] / total for p, v in lp.items()},
        "importance_vs_forward_backward_cpu": 0.05,
        "mask_update_vs_forward_backward_cpu": 0.005,
        "loraprune_vs_lora_step_cpu": total / 4.0,
        "profiler": {"importance": {"ops": 8000, "self_cpu_ms": 120.0},
                     "forward_backward": {"ops": 43000, "self_cpu_ms": 2400.0}},
        "callback_cpu_s_per_step": {"on_pre_optimizer_step": 0.1, "on_step_begin": 0.0},
    }  # fmt: skip
    text = report.loraprune_breakdown({"loraprune": {"breakdown": breakdown}})
    assert f"**{total / 4.0:.3f}×**" in text and "| importance | – | 0.100 s |" in text
    assert "8000 ops" in text and "on_pre_optimizer_step 100.0 ms" in text and "on_step_begin" not in text
    assert "not yet measured" in report.loraprune_breakdown({"loraprune": {"cost": {}}})
    assert "not yet measured" in report.loraprune_breakdown({})
    assert "loraprune-breakdown" in report.SECTIONS
