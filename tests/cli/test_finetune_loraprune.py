"""`prune-peft finetune --method loraprune` on tiny models."""

import json

import pytest

from prune_peft.cli import main


def test_finetune_cli_with_loraprune(tiny_model, tokenizer, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model(num_hidden_layers=3).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(src), "--method", "loraprune", "--target-sparsity", "0.5"]
    argv += ["--prune-every", "1", "--n-train", "16", "--n-eval", "0", "--max-steps", "3", "--batch-size", "4"]
    argv += ["--logging-steps", "1", "--max-length", "96", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :])
    assert summary["method"] == "loraprune" and summary["steps"] == 3
    assert summary["prune_metrics"]["prune/target_sparsity"] == 0.5
    assert summary["layers"]["num_key_value_heads"] == [1, 1, 2]  # default exclusion: the last block
    assert summary["params_after"] < summary["params_before"]
    assert (out / "adapter_config.json").exists() and (out / "compacted" / "config.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-sparsity", "1.0"], "target_sparsity"),
        (["--structure", "rows"], "structure"),
        (["--prune-every", "0"], "prune_every"),
    ],
)
def test_finetune_cli_rejects_bad_loraprune_input_before_loading(tmp_path, capsys, extra, message):
    rc = main(["finetune", "--method", "loraprune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
               *extra])  # fmt: skip
    assert rc == 2 and message in capsys.readouterr().err
