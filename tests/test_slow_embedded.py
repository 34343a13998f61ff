"""A small marked set of tests on the embedded SmolLM2-135M model (CI runs them too)."""

import json

import pytest

from prune_peft.models import cache_dir

pytestmark = pytest.mark.slow


def test_embedded_model_converted_once_and_cached(embedded):
    model, tok = embedded
    assert (cache_dir() / "smollm2-135m" / ".complete").exists()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tok.eos_token == "<|im_end|>"


def test_demo_quick_wanda_stage(tmp_path):
    from prune_peft.demo import run_demo

    report = run_demo(tmp_path, quick=True, stages=["wanda_2:4"])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["wanda_2:4"]["2:4_valid"] is True
    assert on_disk["wanda_2:4"]["ppl"] > on_disk["load"]["ppl_dense"]
    assert report["wanda_2:4"]["sparsity"] >= 0.5
