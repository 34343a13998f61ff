"""benchmarks/report.py's quality sections (issue #18): claim next to the verdicts, the Q-Tuning attribution table
and the one-shot calibration-grid note, all generated from quality.json."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_q", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("report")

SETTINGS = {"seeds": 3, "eval_windows": 8, "eval_seqlen": 512, "oneshot_grid": [[8, 512], [32, 512]]}


def _arm(nll: float) -> dict:
    return {"mean": nll, "lo": nll - 0.01, "hi": nll + 0.01, "ppl": 2.0, "ppl_lo": 1.9, "ppl_hi": 2.1, "seeds": 3,
            "windows": 32}  # fmt: skip


def _diff(mean: float, verdict: str) -> dict:
    return {"mean": mean, "lo": mean - 0.01, "hi": mean + 0.01, "verdict": verdict}


def _qtuning() -> dict:
    arms = {
        "full data": 0.90,
        "Q-Tuning 25%×50% keep high": 1.00,
        "Q-Tuning 25%×50% keep low": 0.97,
        "sample-only 25%×100%": 0.99,
        "token-only 100%×50%": 0.93,
        "random 25% same steps": 0.95,
    }
    return {
        "claim": "Q-Tuning beats random",
        "metric": "held-out response-token NLL",
        "settings": SETTINGS,
        "windows_are": "32 held-out problems",
        "dense": _arm(1.6),
        "arms": {k: _arm(v) for k, v in arms.items()},
        "comparisons": {
            "Q-Tuning (keep high) vs random 25% same steps": _diff(0.05, "contradicts"),
            "sample-only vs random 25% same steps": _diff(0.04, "contradicts"),
            "token-only vs full data": _diff(0.03, "contradicts"),
        },
    }


def test_claim_is_quoted_directly_above_the_verdicts_and_base_is_not_called_dense():
    text = report.SECTIONS["quality-qtuning"]({"quality": {"comparisons": {"qtuning": _qtuning()}}})
    claim = "Verdicts (paired, method − baseline) against the paper's claim: *Q-Tuning beats random*"
    assert claim in text
    after = text.split(claim, 1)[1].lstrip("\n")
    assert after.startswith("| comparison (method − baseline) | Δ of the metric [95 % CI] | verdict |")
    assert "| base model (no fine-tuning) |" in text and "dense (unpruned)" not in text


def test_qtuning_attribution_decomposes_the_gap_from_the_arm_means():
    text = report.qtuning_attribution(_qtuning())
    # Q-Tuning − full (+0.10) = (random − full: +0.05) + (Q-Tuning − random: +0.05); the latter = selection (+0.04)
    # + token pruning inside the selected samples (+0.01)
    assert "| Q-Tuning vs full data | Q-Tuning 25%×50% keep high − full data | +0.1000 | – (no paired" in text
    assert "chosen at random | random 25% same steps − full data | +0.0500 | – (no paired interval recorded) |" in text
    assert "keep high − random 25% same steps | +0.0500 | +0.0500 [+0.0400, +0.0600] | contradicts |" in text
    assert (
        "sample-only 25%×100% − random 25% same steps | +0.0400 | +0.0400 [+0.0300, +0.0500] | contradicts |" in text
    )
    assert "keep high − sample-only 25%×100% | +0.0100 | – (no paired interval recorded) | – |" in text
    assert "keep high − Q-Tuning 25%×50% keep low | +0.0300 |" in text
    assert "token-only 100%×50% − full data | +0.0300 | +0.0300 [+0.0200, +0.0400] | contradicts |" in text
    arms = report.SECTIONS["quality-qtuning"]({"quality": {"comparisons": {"qtuning": _qtuning()}}})
    # the arms are shown as NLL, the unit of the verdicts and the attribution
    assert (
        "| arm | mean NLL [95 % CI] | seeds × windows |" in arms and "| full data | 0.9000 [0.8900, 0.9100] |" in arms
    )
    partial = _qtuning()
    del partial["arms"]["sample-only 25%×100%"]
    assert "sample-only" not in report.qtuning_attribution(partial)
    assert report.qtuning_attribution({"arms": {}, "comparisons": {}}) == ""


def _oneshot(grid) -> dict:
    arms = {
        f"{m} {p} {n}x{L}": {**_arm(3.0), "method": m, "pattern": p, "nsamples": n, "seqlen": L, "seconds": [1.0]}
        for m in ("wanda", "sparsegpt")
        for p in ("50%", "2:4")
        for n, L in grid
    }
    return {"claim": "more tokens help", "settings": {**SETTINGS, "oneshot_grid": grid}, "arms": arms,
            "comparisons": {}, "minutes": 42.4}  # fmt: skip


def test_oneshot_note_names_the_grid_run_the_points_left_out_and_the_command():
    text = report.oneshot_grid_note(_oneshot([[8, 512], [32, 512]]))
    assert "this run (nsamples × seqlen, from its settings): 8 × 512, 32 × 512, i.e. 4,096, 16,384" in text
    assert "**Not run**: 128 × 512, 32 × 2048, 128 × 2048 of the issue's grid" in text
    assert "they are 4×, 4×, 16× the calibration tokens of the largest point run (32 × 512)" in text
    assert "3 more points × 4 method/pattern arms × 3 seed(s). This comparison took 42 min" in text
    assert "python benchmarks/quality.py --only oneshot --oneshot-grid 32x512,128x512,32x2048,128x2048" in text
    full = report.oneshot_grid_note(_oneshot([[32, 512], [128, 512], [32, 2048], [128, 2048]]))
    assert full.endswith("It covers the issue's grid (32, 128 samples × 512, 2048 tokens).")
    assert "Not run" not in full and "--oneshot-grid" not in full
    section = report.SECTIONS["quality-oneshot"]({"quality": {"comparisons": {"oneshot": _oneshot([[8, 512]])}}})
    assert "Calibration grid of this run (nsamples × seqlen, from its settings): 8 × 512," in section


def test_loraprune_memory_table_adds_the_importance_gradient_column_only_when_measured():
    arm = {"peak_rss_mb": 2070.0, "model_rss_mb": 1064.0, "training_mb": 1006.0}
    m = {"shape": [2, 256], "loraprune": dict(arm), "grad": dict(arm), "ratios": {"peak_rss lora ÷ grad": 1.0}}
    assert "gradient state" not in report.quality_memory(m)
    m["loraprune"]["importance_grad_mb"], m["grad"]["importance_grad_mb"] = 4.5, 513.0
    text = report.quality_memory(m)
    assert "gradient state the importance reads" in text
    assert "| loraprune | 2070 MB | 1064 MB | 1006 MB | 4.5 MB |" in text
    assert "| grad | 2070 MB | 1064 MB | 1006 MB | 513.0 MB |" in text
