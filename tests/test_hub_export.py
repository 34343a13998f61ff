"""export(format="compacted" | "merged"): stock checkpoints with a model card that says what they are."""

import pytest
import torch
from peft import get_peft_model

from prune_peft import LoRAPruneConfig
from prune_peft.hub import export, stock_reload
from prune_peft.testing import tiny_causal_lm

IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(3))


def trained(uniform=True, dtype=torch.float32, steps=3):
    model = get_peft_model(
        tiny_causal_lm(num_hidden_layers=3, dtype=dtype),
        LoRAPruneConfig(
            r=4,
            target_sparsity=0.5,
            uniform=uniform,
            channel_multiple=32,
            schedule_steps=steps,
            warmup=0.0,
            cooldown=0.0,
            prune_every=1,
            **({} if uniform else {"exclude_layers": [2]}),
        ),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model.eval()


def test_compacted_export_is_stock_and_equals_the_masked_model(tmp_path):
    model = trained()
    with torch.no_grad():
        masked = model(IDS).logits
    info = export(
        model,
        tmp_path / "small",
        format="compacted",
        base_model="me/tiny",
        data="Shakespeare (train)",
        perplexity=12.5,
    )
    assert (info["num_key_value_heads"], info["num_attention_heads"], info["intermediate_size"]) == (1, 2, 64)
    assert info["params_after"] < info["params_before"] and info["dtype"] == "float32"
    out = stock_reload(tmp_path / "small", IDS)
    torch.testing.assert_close(out["logits"], masked, rtol=1e-5, atol=1e-5)
    assert out["params"] == info["params_after"]
    card = (tmp_path / "small" / "README.md").read_text()
    for text in ("base_model: me/tiny", "Shakespeare (train)", "12.500", "vLLM", "q_proj 0.5000", "loraprune"):
        assert text in card, text
    assert model.base_model.get_masks()  # the PeftModel is untouched (still an adapter with masks)


def test_compacted_export_keeps_the_bf16_base_dtype(tmp_path):
    import json

    export(trained(dtype=torch.bfloat16), tmp_path / "bf16", format="compacted")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    export(trained(dtype=torch.bfloat16), tmp_path / "f32", format="compacted", dtype="float32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_bad_exports_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"one size for every block.*uniform=True"):
        export(trained(uniform=False), tmp_path / "a", format="compacted")
    assert not (tmp_path / "a").exists()
    from prune_peft import SparseLoraConfig

    sparse = get_peft_model(tiny_causal_lm(num_hidden_layers=2), SparseLoraConfig(r=4, require_sparsity=False))
    with pytest.raises(ValueError, match="structured LoRAPrune"):
        export(sparse, tmp_path / "b", format="compacted")
    with pytest.raises(ValueError, match="format must be one of"):
        export(sparse, tmp_path / "c", format="gguf")
    with pytest.raises(ValueError, match="dtype"):
        export(sparse, tmp_path / "d", dtype="float99")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("x")
    with pytest.raises(ValueError, match="overwrite"):
        export(trained(), tmp_path / "e", format="compacted")


@pytest.mark.parametrize("multiple", [128, 129, 4096])
def test_channel_multiple_not_below_the_mlp_width_is_refused_and_the_model_is_untouched(multiple):
    base = tiny_causal_lm(num_hidden_layers=2)  # intermediate_size 128
    names = [n for n, _ in base.named_modules()]
    config = LoRAPruneConfig(r=4, target_sparsity=0.5, uniform=True, channel_multiple=multiple)
    with pytest.raises(ValueError, match=rf"channel_multiple={multiple} is not smaller than the MLP width 128"):
        get_peft_model(base, config)
    assert [n for n, _ in base.named_modules()] == names  # rolled back: no adapter layer left behind


def test_channel_multiple_below_the_width_is_accepted():
    model = get_peft_model(
        tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(r=4, uniform=True, channel_multiple=64)
    )
    assert model.peft_config["default"].channel_multiple == 64
