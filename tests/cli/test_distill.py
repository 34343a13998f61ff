"""`prune-peft distill` on a tiny saved teacher."""

import json

import pytest
from datasets import load_from_disk

from prune_peft.cli import main


@pytest.fixture
def saved_teacher(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "teacher"
    tiny_model("llama", seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_distill_writes_dataset_and_stats(saved_teacher, tmp_path, capsys):
    out = tmp_path / "data" / "distilled"
    argv = ["distill", "--teacher", saved_teacher, "--dataset", "arithmetic", "--n", "5", "--template", "math"]
    argv += ["--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    ds = load_from_disk(str(out))
    assert len(ds) == 5 and {"prompt", "completion", "answer", "distill_accepted"} <= set(ds.column_names)
    stats = json.loads((out / "distill_stats.json").read_text())
    assert stats["rows"] == 5 and stats["template"] == "math"
    assert json.loads(capsys.readouterr().out)["rows"] == 5
    assert (tmp_path / "data" / ".distilled.cache" / "config.json").exists()
    assert main(argv) == 2  # --out exists: one line, exit code 2, like every other bad input
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and len(err.strip().splitlines()) == 1
    # a different setting against the same cache: clear error, exit code 2
    assert main([*argv[:-1], str(tmp_path / "other"), "--cache-dir", str(tmp_path / "data" / ".distilled.cache")]) == 0
    rc = main(
        [*argv[:-3], "5", "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "data" / ".distilled.cache")]
    )
    assert rc == 2
    assert "holds a different configuration" in capsys.readouterr().err


def test_cli_distill_bad_dataset(saved_teacher, tmp_path, capsys):
    rc = main(
        ["distill", "--teacher", saved_teacher, "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert (
        rc == 2
        and "--dataset must be 'arithmetic', 'shakespeare' or a saved dataset folder" in capsys.readouterr().err
    )
