"""`prune-peft finetune --qtuning` (tiny models, 2 steps)."""

import json

import pytest

from prune_peft.cli import main


def test_finetune_cli_with_qtuning(tiny_model, tokenizer, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model(num_hidden_layers=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(src), "--qtuning", "--sample-ratio", "0.5", "--token-ratio", "0.5"]
    argv += ["--n-train", "16", "--n-eval", "4", "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1"]
    argv += ["--max-length", "160", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out  # the Trainer's log lines, then the summary as indented JSON
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :])
    assert summary["steps"] == 2 and summary["qtuning"]["sample_ratio"] == 0.5
    assert summary["qtuning_last_log"]["qtuning/kept_sample_share"] == 0.5
    assert (out / "adapter_config.json").exists() and (out / "finetune_report.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qtuning", "--sample-ratio", "0"], "sample_ratio must be a number in (0, 1]"),
        (["--qtuning", "--token-ratio", "1.5"], "token_ratio must be a number in (0, 1]"),
        (["--sample-ratio", "0.5"], "need --qtuning"),
        (["--data", "nowhere"], "--data must be"),
    ],
)
def test_finetune_cli_rejects_bad_input_before_loading(tmp_path, capsys, extra, message):
    rc = main(["finetune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
