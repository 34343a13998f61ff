"""examples/qtuning_sft.py on a tiny model."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qtuning_sft.py"


def test_example_script_runs_on_a_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("qtuning_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--max-steps", "2", "--out", str(tmp_path)])
    assert result["qtuning/kept_sample_share"] == 0.25  # 2 of each batch of 8
    assert result["plots"] == ["eu_plane_step000002.png"] and result["eval_loss"] > 0
