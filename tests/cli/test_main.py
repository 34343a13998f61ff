"""The command line itself: verbs, --help from the option dataclasses, config files, one-line user errors."""

import dataclasses
import json

import pytest

from prune_peft.cli import VERBS, main
from prune_peft.cli.finetune import METHODS, option_types


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_top_level_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb, summary in VERBS.items():
        assert verb in out and summary.split()[0] in out


def test_unknown_or_missing_verb_is_a_usage_error(capsys):
    assert _one_line_error(capsys, ["prunee"]).startswith("prune-peft: error: unknown verb 'prunee'")
    assert main([]) == 2 and "VERB" in capsys.readouterr().err


def _fields_and_help(types):
    for t in types:
        for f in dataclasses.fields(t):
            if f.init and f.metadata.get("help"):
                yield f.name, " ".join(f.metadata["help"].split()[:2])  # argparse may break long words


@pytest.mark.parametrize("verb", ["prune", "eval", "distill", "demo"])
def test_verb_help_lists_each_field_with_its_help(capsys, verb):
    import importlib

    module = importlib.import_module(f"prune_peft.cli.{verb}")
    out = _help(capsys, [verb])
    for name, help_start in _fields_and_help(module.option_types([], {})):
        assert f"--{name}" in out and help_start in out, (name, help_start)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_finetune_help_shows_the_chosen_adapter_config(capsys, method):
    out = _help(capsys, ["finetune", "--method", method])
    types = option_types(["--method", method], {})
    own = {f.name for f in dataclasses.fields(types[1])}
    for name, help_start in _fields_and_help(types[:3]):  # model/data, adapter, Q-Tuning (SFTConfig is trl's)
        assert f"--{name}" in out and help_start in out, (name, help_start)
    assert {"r", "lora_alpha", "target_modules"} <= own
    if method == "loraprune":
        assert {"target_sparsity", "structure", "prune_every"} <= own
    if method == "spp":
        assert {"n_blocks", "forward_mode"} <= own
    if method == "sparse_lora":
        assert {"grad_mode", "require_sparsity"} <= own
    for short in ("--out", "--lr", "--batch-size", "--grad-accum", "--epochs", "--lora-r", "--sample-ratio"):
        assert short in out


def test_argparse_errors_are_one_line_exit_2(capsys, tmp_path):
    line = _one_line_error(capsys, ["prune", "--method", "bogus", "--out", str(tmp_path / "o")])
    assert line.startswith("prune-peft prune: error:") and "bogus" in line
    assert "--out is required" in _one_line_error(capsys, ["prune", "--pattern", "2:4"])
    assert "--out" in _one_line_error(capsys, ["finetune"])
    assert "not used" in _one_line_error(capsys, ["eval", "--no-such-flag", "1"])
    line = _one_line_error(capsys, ["finetune", "--method", "dora", "--out", str(tmp_path / "o")])
    assert "--method must be one of" in line and "dora" in line


def test_yaml_config_file_and_command_line_override(tmp_path, capsys):
    from prune_peft.cli._common import parse_options, read_config, split_config
    from prune_peft.cli.prune import PruneOptions

    cfg = tmp_path / "prune.yaml"
    cfg.write_text("method: magnitude\npattern: '2:4'\nnsamples: 3\nexclude: [lm_head]\nout: runs/a\n")
    for argv in (["prune.yaml", "--nsamples", "5"], ["--config", "prune.yaml", "--nsamples", "5"]):
        rest, path = split_config([a.replace("prune.yaml", str(cfg)) for a in argv])
        (opts,) = parse_options("prune-peft prune", [PruneOptions], rest, description="", config=read_config(path))
        assert (opts.method, opts.pattern, opts.exclude, opts.out) == ("magnitude", "2:4", ["lm_head"], "runs/a")
        assert opts.nsamples == 5  # the command line wins over the file


def test_json_config_drives_a_verb_and_unknown_keys_fail(tmp_path, capsys):
    cfg = tmp_path / "prune.json"
    cfg.write_text(json.dumps({"method": "magnitude", "pattern": "3:2", "out": str(tmp_path / "o")}))
    assert "impossible" in _one_line_error(capsys, ["prune", str(cfg)])  # the file's values reached the verb
    assert not (tmp_path / "o").exists()
    cfg.write_text(json.dumps({"methd": "magnitude"}))
    assert "unknown option(s) ['methd']" in _one_line_error(capsys, ["prune", str(cfg)])
    assert "does not exist" in _one_line_error(capsys, ["prune", "--config", str(tmp_path / "none.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "mapping" in _one_line_error(capsys, ["prune", str(tmp_path / "list.yaml")])


def test_finetune_config_file_picks_the_method(tmp_path, capsys):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"method: spp\nn_blocks: 0\nout: {tmp_path / 'o'}\n")
    assert "n_blocks must be a positive integer" in _one_line_error(capsys, ["finetune", str(cfg)])
    # a flag overrides the file's method; n_blocks is then not an option of that method
    assert "n_blocks" in _one_line_error(capsys, ["finetune", str(cfg), "--method", "lora"])


def test_qtuning_options_without_qtuning_and_bad_adapter_values(tmp_path, capsys):
    base = ["finetune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    assert "need --qtuning" in _one_line_error(capsys, [*base, "--qtuning-lam", "0.3"])
    assert "lam must be a number in [0, 1]" in _one_line_error(capsys, [*base, "--qtuning", "--qtuning-lam", "2"])
    line = _one_line_error(capsys, [*base, "--method", "sparse_lora", "--grad_mode", "fast"])
    assert "grad_mode='fast' is not supported" in line
    assert "--lora-r must be a positive integer" in _one_line_error(capsys, [*base, "--lora-r", "0"])
    assert not (tmp_path / "o").exists()
