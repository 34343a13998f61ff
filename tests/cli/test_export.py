"""`prune-peft export` / `merge` and `eval` on the folders they write (tiny local models, offline)."""

import json

import torch
from peft import get_peft_model

from prune_peft import LoRAPruneConfig
from prune_peft.cli import main
from prune_peft.hub import stock_reload

IDS = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(2))


def adapter_folder(tiny_model, tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoRAPruneConfig(
            r=4,
            uniform=True,
            channel_multiple=32,
            target_sparsity=0.5,
            schedule_steps=2,
            warmup=0.0,
            cooldown=0.0,
            prune_every=1,
        ),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    with torch.no_grad():
        masked = model.eval()(IDS).logits
    model.save_pretrained(tmp_path / "adapter")  # no tokenizer files: eval/export take the base's
    return base, tmp_path / "adapter", masked


def test_export_compacted_then_eval_every_folder(tiny_model, tokenizer, tmp_path, capsys):
    _base, adapter, masked = adapter_folder(tiny_model, tokenizer, tmp_path)
    out = tmp_path / "small"
    argv = ["export", "--adapter", str(adapter), "--format", "compacted", "--out", str(out), "--data", "arith"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_key_value_heads"] == 1 and info["intermediate_size"] == 64
    reloaded = stock_reload(out, IDS)
    torch.testing.assert_close(reloaded["logits"], masked, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").exists() and "arith" in (out / "README.md").read_text()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    for folder, kind in ((out, "model"), (tmp_path / "merged", "model"), (adapter, "adapter")):
        assert main(["eval", "--model", str(folder), "--seqlen", "32", "--windows", "2"]) == 0, folder
        printed = json.loads(capsys.readouterr().out)
        assert printed["kind"] == kind and printed["perplexity"] > 1
        assert printed["not_counted"] == ["lm_head", "model.embed_tokens"] or kind == "adapter"


def test_export_bad_input_is_one_line(tiny_model, tokenizer, tmp_path, capsys):
    assert main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert (
        main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o"), "--format", "gguf"]) == 2
    )
    assert "--format must be one of merged, lora, compacted" in capsys.readouterr().err
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_eval_model_plus_adapter_equals_eval_of_the_adapter_folder(tiny_model, tokenizer, tmp_path, capsys):
    """`eval --model BASE --adapter DIR` (the issue's form) is `eval --model DIR --base BASE`; bad pairs are one line."""
    base, adapter, _ = adapter_folder(tiny_model, tokenizer, tmp_path)
    common = ["--seqlen", "32", "--windows", "2"]
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), *common]) == 0
    attached = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(adapter), "--base", str(base), *common]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert attached["kind"] == direct["kind"] == "adapter"
    assert attached["perplexity"] == direct["perplexity"]
    assert main(["eval", "--model", str(base), "--adapter", str(base), *common]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "no adapter_config.json" in err
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--base", str(base), *common]) == 2
