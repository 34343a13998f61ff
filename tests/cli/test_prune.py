"""`prune-peft prune` on a tiny local model."""

import json

from prune_peft.cli import main


def test_prune_cli_on_local_model(tiny_model, tokenizer, tmp_path, capsys):
    model = tiny_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    rc = main(
        [
            "prune",
            "--model",
            str(src),
            "--method",
            "magnitude",
            "--pattern",
            "2:4",
            "--out",
            str(out),
            "--eval-windows",
            "1",
            "--seqlen",
            "32",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nm_valid"] is True and abs(summary["sparsity"] - 0.5) < 1e-9
    report = json.loads((out / "prune_report.json").read_text())
    assert report["prune"]["method"] == "magnitude"
    from prune_peft.models import load_model

    pruned = load_model(str(out))
    w = pruned.model.layers[0].self_attn.q_proj.weight
    assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()


def test_prune_cli_bad_input_exit_code(tiny_model, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    rc = main(
        [
            "prune",
            "--model",
            str(src),
            "--method",
            "magnitude",
            "--pattern",
            "3:2",
            "--out",
            str(tmp_path / "o"),
            "--eval-windows",
            "0",
        ]
    )
    assert rc == 2
    assert "impossible" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
