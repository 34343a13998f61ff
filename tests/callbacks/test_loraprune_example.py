"""examples/loraprune_finetune.py on a tiny model."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "loraprune_finetune.py"


def test_example_script_runs_on_a_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("loraprune_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--max-steps", "4", "--seqlen", "32", "--out", str(tmp_path)])
    # 4 blocks, the last excluded; 20 % of 2 KV units rounds to 0, of 128 channels to 26
    assert result["layers"]["intermediate_size"] == [102, 102, 102, 128]
    assert result["prune/pruned_channels"] == 3 * 26
    assert result["params_pruned"] == result["params_dense"] - 3 * 26 * 3 * 64
    assert result["ppl_pruned"] > 0
