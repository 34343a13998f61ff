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


def _paired(median: float, lo: float, hi: float, n: int = 3) -> dict:
    return {"median": median, "min": lo, "max": hi, "n": n}


def test_qtuning_floor_rows_and_not_measured_when_the_key_is_absent():
    old = report.qtuning_section({"qtuning": _qtuning(STAMP)})
    assert (
        "its floor (no-grad scoring of every sample + SFT on the kept share), wall time, paired median | "
        "not measured | ≤ 1.10× — not measured |"
    ) in old
    data = _qtuning(STAMP)
    data["paired_timing"]["vs_floor"] = _paired(1.12, 1.05, 1.3)
    data["paired_timing"]["floor_vs_full"] = _paired(0.61, 0.6, 0.7)
    text = report.qtuning_section({"qtuning": data})
    assert "paired median | 1.12× (1.05–1.30 over 3 pairs) | ≤ 1.10× — **missed** |" in text
    assert "| the floor ÷ full-data SFT, wall time, paired median | 0.61× (0.60–0.70 over 3 pairs) | – |" in text


def _distill(**extra) -> dict:
    tp = {
        "prompts": 24, "mean_prompt_tokens": 116, "max_new_tokens": 40, "batch_size": 24,
        "per_sample_rows_per_s": 0.4, "batched_rows_per_s": 2.2, "speedup_wall": 5.5, "speedup_cpu_time": 5.0,
        "identical_outputs": 1.0, "decode_step_speedup_cpu_time": 7.0, "prefill_speedup_cpu_time": 1.3, **extra,
    }  # fmt: skip
    return {"stamp": STAMP, "throughput": tp}


def test_distill_pairs_of_prefill_decode_and_no_prefix_cache():
    text = report.distill_throughput({"distill": _distill()})
    assert "| prefill alone (one new token) | not measured | – |" in text
    assert "(headline) | 5.50× (no pairs recorded) | ≥ 5× — met |" in text
    text = report.distill_throughput(
        {
            "distill": _distill(
                speedup_wall_pairs=_paired(5.5, 5.1, 6.0),
                speedup_wall_no_prefix_cache_pairs=_paired(4.2, 4.0, 4.4),
                prefill_speedup_pairs=_paired(1.3, 1.2, 1.4),
                decode_speedup_pairs=_paired(8.0, 7.5, 8.5),
            )
        }
    )
    assert "(headline) | 5.50× (5.10–6.00 over 3 pairs) | ≥ 5× — met |" in text
    assert "without the prefix cache | 4.20× (4.00–4.40 over 3 pairs) | – |" in text
    assert "| prefill alone (one new token) | 1.30× (1.20–1.40 over 3 pairs) | – |" in text
    assert "| decode (whole run minus prefill) | 8.00× (7.50–8.50 over 3 pairs) | – |" in text


def _adapters(dtype: str, exact: float, profile: dict | None = None) -> dict:
    row = {"step_s": 3.0, "time_ratio": 1.0, "peak_rss_mb": 1024, "peak_rss_ratio": 1.0, "training_mb": 512,
           "training_mem_ratio": 1.0, "ppl_merged": 100.0, "sparsity_after_merge": 0.0}  # fmt: skip
    sl = {**row, "time_ratio": exact, "time_ratio_pairs": _paired(exact, exact - 0.05, exact + 0.05, 4)}
    if dtype == "bfloat16":
        sl["vs_legacy"] = {**_paired(1.01, 0.97, 1.02, 4), "legacy_step_s": 2.9}
    data = {"stamp": STAMP, "dtype": dtype, "batch": [4, 256], "threads": 2, "steps": 6, "rank": 16,
            "sparsity_pruned": 0.5, "ppl_dense": 50.0, "ppl_pruned": 170.0,
            "adapters": {"lora": row, "sparse_lora": sl}}  # fmt: skip
    if profile:
        data["profile"] = profile
    return data


def test_adapters_bf16_section_and_readme_row_judge_the_bf16_run():
    res = {"adapters": _adapters("float32", 1.18), "adapters_bf16": _adapters("bfloat16", 0.92)}
    text = report.adapters_bf16_section(res)
    assert "| SparseLoRA (default, exact gradients) | 3.00 s | 0.92× (0.87–0.97 over 4 pairs) | 2.90 s | " in text
    assert "1.01× (0.97–1.02 over 4 pairs) |" in text
    assert "SparseLoRA (default, exact gradients) in bfloat16: time ≤ 1.15× — met" in text
    assert "breakdown and the exact mode's floor: **not measured**" in text
    readme = report.readme_benchmarks(res)
    # the default (fp32) headline is judged on fp32, the bf16 row on bf16: one missed, one met
    assert (
        '| SparseLoRA (default `grad_mode="exact"`) step time ÷ LoRA | 1.18× (1.13–1.23 over 4 pairs) | ≤ 1.15× — **missed** |'
        in readme
    )
    assert "LoRA, bfloat16 model (half-precision path) | 0.92× (0.87–0.97 over 4 pairs) | ≤ 1.15× — met |" in readme
    assert "no `benchmarks/results/adapters_bf16.json`" in report.adapters_bf16_section({})


def test_adapter_profile_renders_the_floor_and_phases():
    phase = {f"{p}{c}_{k}": v for p in ("forward", "backward", "optimizer") for c in ("", "_cpu")
             for k, v in (("s", 1.0), ("vs_lora", 1.0))}  # fmt: skip
    profile = {
        "phases": {"lora": phase, "sparse_lora": {**phase, "backward_s": 1.4, "backward_vs_lora": 1.4}},
        "extra_gemm": {
            "layers": 210,
            "tokens": 1024,
            "dtype": "float32",
            "extra_gemm_s": 0.9,
            "base_forward_gemm_s": 0.85,
        },
        "summary": {
            "exact_floor_ratio": 1.16,
            "exact_floor_ratio_cpu": 1.17,
            "exact_step_vs_lora": 1.18,
            "exact_backward_minus_lora_s": 0.95,
            "exact_backward_excess_over_extra_gemm": 1.06,
            "exact_backward_excess_over_extra_gemm_cpu": 1.04,
            "exact_minus_lors_s": 0.88,
            "exact_minus_lors_over_extra_gemm": 0.98,
        },
        "backward_profiler": {"backward_cpu_vs_lora": {"lora": 1.0, "sparse_lora": 1.3}},
    }
    text = report.adapters_section({"adapters": _adapters("float32", 1.18, profile)})
    assert "LoRA's step plus those GEMMs = **1.16×** LoRA's step (1.17× in CPU time)" in text
    assert "measured 1.18× in the same rounds" in text and "(1.06× the extra GEMM; in CPU time 1.04×)" in text
    assert "| SparseLoRA (default, exact gradients) | 1.00 s (1.00×) | 1.40 s (1.40×) |" in text
    assert "÷ LoRA's: SparseLoRA (default, exact gradients) 1.30×" in text
    assert 'Exact minus `grad_mode="lors"` (the same forward and input gradient): 0.88 s per step, 0.98× the' in text
    assert "also run over" not in text  # fp32: no half-precision floor sentence
    half = {
        **profile,
        "summary": {**profile["summary"], "half_split_floor_ratio": 1.33, "half_split_floor_ratio_cpu": 1.38},
    }
    half["extra_gemm"] = {**profile["extra_gemm"], "dtype": "bfloat16"}
    text = report.adapters_bf16_section({"adapters_bf16": _adapters("bfloat16", 1.3, half)})
    assert "In bfloat16 the forward and input-gradient GEMMs also run over `[W | ΔW]`" in text
    assert "= **1.33×** (1.38× in CPU time)" in text


def test_distill_goal_needs_identical_outputs():
    assert report._distill_goal({"speedup_wall": 5.5, "identical_outputs": 1.0}) == "≥ 5× — met"
    assert report._distill_goal({"speedup_wall": 5.5, "identical_outputs": 0.95}) == (
        "≥ 5× — **missed** (outputs identical: 95%)"
    )
    assert report._distill_goal({"speedup_wall": 4.0, "identical_outputs": 0.95}) == "≥ 5× — **missed**"


def test_loraprune_goal_marks_unpaired_runs():
    paired = {"paired": {"loraprune_vs_lora_time": _paired(1.08, 1.02, 1.12)}, "ratios": {}}
    assert report._loraprune_goal(paired) == "≤ 1.10× — met"
    unpaired = {"ratios": {"loraprune_vs_lora_time": 1.05}}
    assert report._loraprune_goal(unpaired) == "≤ 1.10× — met (separate runs, not the goal's interleaved pairs)"


def test_gpu_goal_is_against_dense_bf16_only():
    sparse24 = _load("sparse24_gpu")
    row = dict(transposable=False, tokens=16384, backend="cusparselt")
    linear = [
        {**row, "d_in": 4096, "d_out": 11008, "dtype": "bf16", "fwd_speedup": 1.2},
        {**row, "d_in": 4096, "d_out": 14336, "dtype": "bf16", "fwd_speedup": 1.3},
        {**row, "d_in": 4096, "d_out": 11008, "dtype": "fp16", "fwd_speedup": 1.9},  # fp16 never counts
        {**row, "d_in": 4096, "d_out": 14336, "dtype": "fp16", "fwd_speedup": 1.9},
    ]
    s = sparse24.goal_summary(linear, None)
    assert s["goal_fwd_min_speedup"] == 1.2 and s["goal_fwd_1.6x_met"] is False
    assert s["max_fwd_speedup_any_config"] == 1.9  # reported, not counted


def test_gpu_log_table_is_parsed_line_by_line():
    # the format sparse24_gpu.py main() prints, a failed configuration and other lines
    log = "\n".join(
        [
            "         shape tokens   dt  T    backend  fwd × fwd+bwd × kernel ×",
            "  4096→11008    16384 bf16  - cusparselt   1.54      1.19     1.39",
            "  4096→14336     2048 fp16  T cusparselt   0.49      0.31      nan",
            "  4096→14336     2048 FAILED RuntimeError: boom",
            "SFT step (smollm2-135m, 4096 tokens): sparse/dense speedup 0.43×",
        ]
    )
    rows = report.parse_gpu_log(log)
    assert [(r["d_out"], r["tokens"], r["dtype"], r["transposable"]) for r in rows] == [
        (11008, 16384, "bf16", False),
        (14336, 2048, "fp16", True),
    ]
    assert rows[0]["fwd_speedup"] == 1.54 and rows[0]["kernel_only_fwd_speedup"] == 1.39
    assert rows[1]["kernel_only_fwd_speedup"] is None


def test_stamp_takes_the_commit_its_caller_names(monkeypatch):
    monkeypatch.setenv("PRUNE_PEFT_GIT_COMMIT", "f" * 40)
    monkeypatch.setenv("PRUNE_PEFT_GIT_DIRTY", "")
    stamp = bench.start_stamp(threads=1)
    assert stamp["git_commit"] == "f" * 40 and stamp["git_dirty"] is False
    monkeypatch.setenv("PRUNE_PEFT_GIT_DIRTY", "1")
    assert bench.start_stamp(threads=1)["git_dirty"] is True


def test_gpu_sft_pair_count_comes_from_the_result_or_its_command_line():
    assert report._sft_pairs({"sft": {"pairs": 7}, "stamp": {"argv": ["--sft-steps", "10"]}}) == "7"
    assert (
        report._sft_pairs({"sft": {}, "stamp": {"argv": ["--batch", "8", "--sft-steps", "10", "--out", "x"]}}) == "10"
    )
    assert report._sft_pairs({"sft": {}, "stamp": {"argv": ["--sft-steps"]}}) == "?"
