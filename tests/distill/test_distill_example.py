import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "self_distill_recovery.py"


def test_example_runs_end_to_end_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("self_distill_recovery", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["layer_drop"]["num_blocks_after"] == 4 and len(results["layer_drop"]["removed"]) == 2
    assert results["distill_stats"]["rows"] == 8
    for name in ("teacher", "pruned", "sft_original", "sft_distilled"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0 and results[name]["n"] == 4
    for name in ("sft_original", "sft_distilled"):
        assert len(results[name]["train_losses"]) == 2  # equal steps for both fine-tunings
    assert (tmp_path / "distill_cache" / "config.json").exists()
