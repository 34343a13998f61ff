"""The demo's last stage: the uniform LoRAPrune result exported as a compacted checkpoint that stock
``from_pretrained`` reloads in a fresh process (quick settings, embedded SmolLM2-135M)."""

import json

import pytest

import prune_peft.demo as demo


@pytest.mark.slow
def test_demo_loraprune_export_reloads_stock_with_the_in_memory_perplexity(tmp_path):
    report = demo.run_demo(tmp_path, quick=True, stages=["loraprune", "export_compacted"])
    assert [name for name, _ in demo.STAGES][-1] == "export_compacted"  # make demo ends with it
    lp, ex = report["loraprune"], report["export_compacted"]
    assert lp["layers"] is None  # uniform: one size for every block
    assert lp["params_compacted"] < lp["params_dense"]
    # what the fresh process loaded is the compacted model: its size, its config, its perplexity
    assert ex["params_reloaded"] == lp["params_compacted"]
    assert ex["config_reloaded"] == lp["config"]
    assert ex["ppl_reloaded"] == pytest.approx(lp["ppl"], rel=1e-3)
    assert ex["tokens_scored"] == report["load"]["eval_windows"] * (report["load"]["eval_seqlen"] - 1)
    out = tmp_path / "loraprune_compacted"
    cfg = json.loads((out / "config.json").read_text())
    assert "prune_peft_layers" not in cfg and cfg["intermediate_size"] == lp["config"]["intermediate_size"]
    assert cfg["intermediate_size"] % 64 == 0
    assert (out / "tokenizer.json").exists() and "Structurally pruned model" in (out / "README.md").read_text()
    assert ex["reload_seconds"] < 60 and ex["stage_seconds"] < 90


def test_export_stage_without_the_loraprune_stage_is_refused(tmp_path):
    ctx = demo.DemoContext(out=tmp_path, quick=True)
    with pytest.raises(ValueError, match="needs the loraprune stage"):
        demo.STAGES[-1][1](ctx)
    assert not (tmp_path / "loraprune_compacted").exists()


def test_stock_perplexity_reports_a_failing_load(tmp_path):
    import torch

    from prune_peft.demo.export import stock_perplexity

    with pytest.raises(RuntimeError, match="failed in a fresh process"):
        stock_perplexity(tmp_path / "missing", [torch.arange(4)])
