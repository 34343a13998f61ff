"""`prune-peft eval` on a tiny local model."""

import json

from prune_peft.cli import main


def test_eval_cli_reports_perplexity_and_sparsity(tiny_model, tokenizer, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    report = tmp_path / "reports" / "eval.json"
    assert main(["eval", "--model", str(src), "--seqlen", "32", "--windows", "2", "--json", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["perplexity"] > 1 and printed["sparsity"] < 0.01 and printed["modules"] > 0
    saved = json.loads(report.read_text())
    assert (
        saved["perplexity"] == printed["perplexity"] and len(saved["sparsity_report"]["modules"]) == printed["modules"]
    )


def test_eval_cli_bad_windows(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--windows", "0"]) == 2
    assert "--windows must be a positive integer" in capsys.readouterr().err
