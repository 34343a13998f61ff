"""The demo's SparseLoRA stage on the embedded SmolLM2-135M (quick settings): Trainer, merge, zeros kept."""

import json

import pytest


@pytest.mark.slow
def test_demo_sparse_lora_stage_quick(tmp_path):
    from prune_peft.demo import run_demo

    report = run_demo(tmp_path, quick=True, stages=["wanda_2:4", "sparse_lora"])
    # the one-shot stage it builds on (one demo run covers both, to keep CI short)
    assert report["wanda_2:4"]["2:4_valid"] is True and report["wanda_2:4"]["sparsity"] >= 0.5
    assert report["wanda_2:4"]["ppl"] > report["load"]["ppl_dense"]
    stage = report["sparse_lora"]
    assert stage["steps"] >= 1 and stage["loss_first"] is not None
    assert stage["sparsity_identical"] and stage["sparsity_before_merge"] == pytest.approx(0.5, abs=0.01)
    assert stage["2:4_valid_after_merge"] == "210/210"
    # quick settings have no warmup: every step trains, so a recovery is measured (and not claimed otherwise)
    assert stage["effective_steps"] == stage["steps"] and all(lr > 0 for lr in stage["learning_rates"])
    assert stage["ppl_dense"] < stage["ppl_pruned"] and stage["ppl_recovered"] == stage["ppl_after_merge"] > 1
    assert (stage["time_budget_cut"] is not None) == stage["stopped_by_time_budget"]
    if stage["steps"] >= 2:
        assert (tmp_path / "sparse_lora_loss.png").stat().st_size > 1000
    else:  # a one-point loss curve is not drawn
        assert stage["loss_curve"] is None and not (tmp_path / "sparse_lora_loss.png").exists()
    card = (tmp_path / "sparse_lora_adapter" / "README.md").read_text()
    assert "sparsity pattern: 2:4" in card and "import prune_peft" in card
    assert json.loads((tmp_path / "report.json").read_text())["sparse_lora"]["steps"] == stage["steps"]
