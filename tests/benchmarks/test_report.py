"""benchmarks/report.py: generated sections come from the results JSON, and --check catches a stale doc."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # report.py and the scripts import their siblings (_bench) by name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("report")
bench = _load("_bench")

STAMP = {
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
    "git_dirty": True,
    "threads": 2,
    "cpu_count": 2,
    "load_1min_start": 0.2,
    "load_1min_end": 3.4,
    "loaded": True,
}


def _qtuning(stamp: dict | None, pairs=(0.7, 0.8, 0.9)) -> dict:
    data = {
        "settings": {"n_train": 64, "batch_size": 8, "pairs": len(pairs), "pair_steps": 2, "threads": 2},
        "heldout_loss_base": 1.6,
        "runs": {
            k: {"samples_in_epoch": 64, "optimizer_steps": 8, "heldout_loss": 1.0}
            for k in ("full", "qtuning_25x50", "random_25%_same_steps", "random_12.5%")
        },
        "ratios_vs_full": {"qtuning_wall": 0.63},
        "paired_timing": {
            "pairs": [{"wall_ratio": p, "cpu_ratio": p, "scoring_share": 0.4} for p in pairs],
            "median_scoring_share": 0.4,
        },
    }
    if stamp is not None:
        data["stamp"] = stamp
    return data


def _doc(tmp_path: Path, body: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    doc = tmp_path / "docs" / "qtuning.md"
    doc.write_text(body)
    return doc


def test_section_is_generated_from_results_and_check_passes_after_write(tmp_path, capsys):
    doc = _doc(tmp_path, "intro\n\n<!-- report:qtuning -->\nstale text 0.63×\n<!-- /report:qtuning -->\n\noutro\n")
    (tmp_path / "benchmarks/results/qtuning.json").write_text(json.dumps(_qtuning(STAMP)))
    assert report.main(["--root", str(tmp_path), "--check"]) == 1
    diff = capsys.readouterr().out
    assert "-stale text 0.63×" in diff and "+| Q-Tuning ÷ full-data SFT, wall time, paired median" in diff
    assert report.main(["--root", str(tmp_path)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n\n<!-- report:qtuning -->\n") and text.endswith(
        "<!-- /report:qtuning -->\n\noutro\n"
    )
    # headline = the paired median with its spread; the long single pair is labelled an alternative; goal missed
    assert "| 0.80× (0.70–0.90 over 3 pairs) | ≤ 0.5× — **missed** |" in text
    assert "alternative: one full epoch each (a single pair), wall time | 0.63×" in text
    assert "commit 0123456+dirty" in text and "load 0.2→3.4" in text and "**loaded machine**" in text
    assert report.main(["--root", str(tmp_path), "--check"]) == 0


def test_check_detects_a_doc_edited_by_hand(tmp_path, capsys):
    doc = _doc(tmp_path, "<!-- report:qtuning -->\n<!-- /report:qtuning -->\n")
    (tmp_path / "benchmarks/results/qtuning.json").write_text(json.dumps(_qtuning(STAMP)))
    report.main(["--root", str(tmp_path)])
    doc.write_text(doc.read_text().replace("0.80×", "0.50×"))
    capsys.readouterr()
    assert report.main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "-| Q-Tuning ÷ full-data SFT, wall time, paired median (headline) | 0.50×" in out
    assert "+| Q-Tuning ÷ full-data SFT, wall time, paired median (headline) | 0.80×" in out


def test_unstamped_results_are_marked_and_missing_results_say_not_measured(tmp_path):
    doc = _doc(tmp_path, "<!-- report:qtuning -->\n<!-- /report:qtuning -->\n<!-- report:sparse24-gpu -->\n"
               "<!-- /report:sparse24-gpu -->\n")  # fmt: skip
    (tmp_path / "benchmarks/results/qtuning.json").write_text(json.dumps(_qtuning(None)))
    report.main(["--root", str(tmp_path)])
    text = doc.read_text()
    assert "Run: (unstamped run)." in text
    assert "| ≥ 1.6× (limit 2×) | **not yet measured** |" in text


def test_goal_is_met_only_when_the_value_reaches_it():
    assert report.goal(1.15, "≤", "1.15").endswith("met")
    assert report.goal(1.1501, "≤", "1.15").endswith("**missed**")
    assert report.goal(4.99, "≥", "5").endswith("**missed**")
    assert report.goal(None, "≥", "5").endswith("not measured")


def test_unknown_or_unbalanced_markers_are_errors():
    with pytest.raises(ValueError, match="unknown report section 'nope'"):
        report.render("<!-- report:nope -->\n<!-- /report:nope -->\n", {})
    with pytest.raises(ValueError, match="unbalanced report markers"):
        report.render("<!-- report:qtuning -->\n", {})


def test_gpu_goal_counts_only_the_named_configuration():
    sparse24 = _load("sparse24_gpu")
    row = dict(transposable=False, tokens=16384, fwd_speedup=1.0, backend="cusparselt")
    linear = [
        {**row, "d_in": 4096, "d_out": 11008, "fwd_speedup": 1.7},
        {**row, "d_in": 4096, "d_out": 14336, "fwd_speedup": 1.5},  # a named shape misses the goal
        {**row, "d_in": 11008, "d_out": 4096, "fwd_speedup": 1.9},  # not named: does not count
        {**row, "d_in": 4096, "d_out": 11008, "tokens": 1024, "fwd_speedup": 1.95},  # not named
    ]
    s = sparse24.goal_summary(linear, {"model": "smollm2-135m", "batch": 8, "seqlen": 512, "step_speedup": 1.3})
    assert s["goal_fwd_1.6x_met"] is False and s["goal_fwd_min_speedup"] == 1.5
    assert s["goal_sft_1.2x_met"] is True
    linear[1]["fwd_speedup"] = 1.6
    assert sparse24.goal_summary(linear, None)["goal_fwd_1.6x_met"] is True
    other_model = {"model": "other", "batch": 8, "seqlen": 512, "step_speedup": 2.0}
    assert sparse24.goal_summary(linear[:1], other_model) == {
        **sparse24.goal_summary(linear[:1], other_model),
        "goal_fwd_1.6x_met": None,  # one of the two named shapes not measured
        "goal_sft_1.2x_met": None,  # another model is not the goal's configuration
    }


def test_stamp_records_commit_versions_machine_and_load(tmp_path):
    stamp = bench.finish_stamp(bench.start_stamp(threads=2))
    for key in ("git_commit", "git_dirty", "versions", "threads", "cpu_model", "load_1min_start", "load_1min_end"):
        assert key in stamp
    assert {"torch", "transformers", "peft"} <= set(stamp["versions"])
    assert isinstance(stamp["loaded"], bool) and stamp["loaded_rule"]
    path = bench.write_results("demo", {"x": 1}, bench.start_stamp(threads=1), out=tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "demo" and data["x"] == 1 and "load_1min_end" in data["stamp"]


def test_loaded_flag_follows_the_other_processes_load():
    assert bench.is_loaded(0.1, 2.2, threads=2, cpu_count=2) is False  # only this run on the cores
    assert bench.is_loaded(1.5, 2.2, threads=2, cpu_count=2) is True  # others were running at the start
    assert bench.is_loaded(0.1, 4.0, threads=2, cpu_count=2) is True  # others joined during the run
    assert bench.is_loaded(0.9, 1.9, threads=1, cpu_count=2) is False  # one core left free, others used < 1.5


def test_quick_runs_never_replace_published_results(tmp_path):
    assert bench.results_path("adapters", quick=True).parent == bench.QUICK_RESULTS != bench.RESULTS
    assert bench.results_path("adapters", quick=False) == bench.RESULTS / "adapters.json"
    doc = _doc(tmp_path, "<!-- report:qtuning -->\n<!-- /report:qtuning -->\n")
    (tmp_path / "benchmarks/results/quick").mkdir()
    (tmp_path / "benchmarks/results/quick/qtuning.json").write_text(json.dumps(_qtuning(STAMP)))
    report.main(["--root", str(tmp_path)])
    assert "**not yet measured** — no `benchmarks/results/qtuning.json`" in doc.read_text()


def test_paired_reports_median_and_spread():
    p = bench.paired([1.2, 1.0, 1.4], "a", "b")
    assert (p["median"], p["min"], p["max"], p["n"]) == (1.2, 1.0, 1.4, 3) and p["ratio"] == "a / b"
    with pytest.raises(ValueError, match="ratios"):
        bench.paired([], "a", "b")


def test_published_docs_agree_with_the_results():
    """The repository's README and docs are what report.py generates from benchmarks/results (make test runs this)."""
    assert report.main(["--check"]) == 0
