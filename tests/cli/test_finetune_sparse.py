"""`prune-peft finetune --method sparse_lora | spp` on a 2:4-pruned tiny model: the adapter keeps every zero."""

import json

import pytest

from prune_peft.cli import main


@pytest.fixture
def pruned_model(tiny_model, tokenizer, tmp_path):
    src, pruned = tmp_path / "src", tmp_path / "pruned"
    tiny_model(num_hidden_layers=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    argv = ["prune", "--model", str(src), "--method", "magnitude", "--pattern", "2:4", "--eval-windows", "0"]
    assert main([*argv, "--out", str(pruned)]) == 0
    return pruned


@pytest.mark.parametrize("method, peft_type", [("sparse_lora", "SPARSE_LORA"), ("spp", "SPP")])
def test_finetune_sparse_method_keeps_the_zeros(pruned_model, tmp_path, capsys, method, peft_type):
    from peft import PeftModel

    from prune_peft.models import load_model

    out = tmp_path / "out"
    argv = ["finetune", "--model", str(pruned_model), "--method", method, "--n-train", "8", "--n-eval", "0"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--max-length", "96", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :])
    assert summary["method"] == method and summary["steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type

    base, reference = load_model(str(pruned_model)), load_model(str(pruned_model))
    zeros = {n: m.weight == 0 for n, m in base.named_modules() if n.endswith("q_proj")}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    changed = False
    for name, module in merged.named_modules():
        if name in zeros:
            assert zeros[name].float().mean() == 0.5
            assert (module.weight[zeros[name]] == 0).all(), name  # every pruned weight is still zero
            changed |= bool((module.weight != reference.get_submodule(name).weight).any())
    assert changed  # training moved the kept weights


def test_finetune_sparse_lora_refuses_a_dense_base(tiny_model, tokenizer, tmp_path, capsys):
    src = tmp_path / "dense"
    tiny_model(num_hidden_layers=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    argv = ["finetune", "--model", str(src), "--method", "sparse_lora", "--n-train", "4", "--n-eval", "0"]
    rc = main([*argv, "--max-steps", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "zero" in capsys.readouterr().err
