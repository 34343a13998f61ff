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


def test_prune_and_eval_share_evaluation_defaults():
    from prune_peft.cli.eval import EVAL_SEQLEN, EVAL_WINDOWS, EvalOptions
    from prune_peft.cli.prune import PruneOptions

    assert (PruneOptions().eval_seqlen, PruneOptions().eval_windows) == (EVAL_SEQLEN, EVAL_WINDOWS)
    assert (EvalOptions().seqlen, EvalOptions().windows) == (EVAL_SEQLEN, EVAL_WINDOWS)


def test_calibration_window_is_separate_and_eval_gives_the_same_perplexity(tiny_model, tokenizer, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    common = ["prune", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2"]
    window = ["--eval-seqlen", "32", "--eval-windows", "3"]
    assert main([*common, "--seqlen", "16", *window, "--out", str(out)]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert (pruned["eval_seqlen"], pruned["eval_windows"]) == (32, 3)
    # another calibration window changes the pruned weights, never the evaluation window: same dense perplexity
    assert main([*common, "--seqlen", "24", *window, "--out", str(tmp_path / "out2")]) == 0
    assert json.loads(capsys.readouterr().out)["ppl_dense"] == pruned["ppl_dense"]
    # the checkpoint `prune` wrote gets the same perplexity from `eval` with the same window
    assert main(["eval", "--model", str(out), "--seqlen", "32", "--windows", "3"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["perplexity"] - pruned["ppl_pruned"]) <= 1e-4 * pruned["ppl_pruned"]


def test_prune_refuses_a_bad_eval_seqlen_before_loading(tmp_path, capsys):
    args = [
        "--model",
        str(tmp_path / "missing"),
        "--sparsity",
        "0.5",
        "--eval-seqlen",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    rc = main(["prune", *args])
    assert rc == 2 and "--eval-seqlen must be an integer >= 2" in capsys.readouterr().err
