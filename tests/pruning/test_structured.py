"""compact(): physically smaller models with the masked model's outputs; save → load round trip."""

import pytest
import torch
from peft import get_peft_model

from prune_peft import LoRAPruneConfig, compact, load_compacted, save_compacted
from prune_peft.hub import stock_reload
from prune_peft.pruning.structured import compacted_shapes
from prune_peft.testing import tiny_causal_lm


def _ids(seed=0):
    return torch.randint(3, 259, (2, 14), generator=torch.Generator().manual_seed(seed))


def _pruned_peft(arch="llama", seed=0):
    model = get_peft_model(
        tiny_causal_lm(arch, seed=seed, num_hidden_layers=3), LoRAPruneConfig(r=4, exclude_layers=[2])
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tuner = model.base_model
    tuner.set_block_masks(0, units=torch.tensor([False, True]), channels=torch.arange(128) % 4 != 1)
    tuner.set_block_masks(1, units=torch.tensor([True, False]), channels=torch.arange(128) < 100)
    return model.eval()


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_compacted_merged_model_equals_masked_model(arch, tmp_path):
    model = _pruned_peft(arch)
    ids = _ids()
    masked = model(ids).logits
    merged = model.merge_and_unload()
    before = _n_params(merged)
    small = compact(merged)
    attn0, mlp1 = small.model.layers[0].self_attn, small.model.layers[1].mlp
    assert attn0.q_proj.weight.shape == (32, 64) and attn0.k_proj.weight.shape == (16, 64)
    assert attn0.o_proj.weight.shape == (64, 32) and mlp1.down_proj.weight.shape == (64, 100)
    removed = 2 * (32 * 64 + 16 * 64 * 2 + 64 * 32) + 3 * 64 * 32 + 3 * 64 * 28
    if arch == "qwen2":
        removed += 2 * (32 + 16 + 16)  # q/k/v biases
    assert before - _n_params(small) == removed
    torch.testing.assert_close(small(ids).logits, masked, rtol=1e-5, atol=1e-5)
    assert compacted_shapes(small) == {
        "num_attention_heads": [2, 2, 4],
        "num_key_value_heads": [1, 1, 2],
        "intermediate_size": [96, 100, 128],
    }
    save_compacted(small, tmp_path)
    reloaded = load_compacted(tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, masked, rtol=1e-5, atol=1e-5)
    assert _n_params(reloaded) == _n_params(small)


def test_compacting_the_unmerged_adapter_slices_lora_factors():
    model = _pruned_peft()
    ids = _ids()
    masked = model(ids).logits
    compact(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.shape == (32, 4) and q.row_mask("default").all()
    o = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o.lora_A["default"].weight.shape == (4, 32)
    torch.testing.assert_close(model(ids).logits, masked, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()  # merging after compaction still works (all masks are now all-kept)
    torch.testing.assert_close(merged(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_masks_are_derived_from_zero_rows_when_none_are_given(tmp_path):
    model = _pruned_peft()
    ids = _ids()
    masked = model(ids).logits
    merged = model.merge_and_unload()
    del merged.prune_peft_masks  # e.g. a merged model saved and reloaded with plain transformers
    small = compact(merged)
    assert compacted_shapes(small)["num_key_value_heads"] == [1, 1, 2]
    torch.testing.assert_close(small(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_explicit_masks_on_a_plain_model_and_generation():
    model = tiny_causal_lm(num_hidden_layers=2)
    ids = _ids()
    masks = {1: {"units": torch.tensor([True, False]), "channels": torch.arange(128) >= 64}}
    # oracle: zero the rows by hand
    ref = tiny_causal_lm(num_hidden_layers=2)
    with torch.no_grad():
        attn, mlp = ref.model.layers[1].self_attn, ref.model.layers[1].mlp
        attn.q_proj.weight[32:] = 0
        attn.k_proj.weight[16:] = 0
        attn.v_proj.weight[16:] = 0
        mlp.gate_proj.weight[:64] = 0
        mlp.up_proj.weight[:64] = 0
    small = compact(model, masks=masks)
    torch.testing.assert_close(small(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # the KV cache copes with per-layer head counts
    out_small = small.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_ref = ref.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out_small, out_ref)


def test_compact_errors(tmp_path):
    with pytest.raises(ValueError, match="every attention head"):
        compact(tiny_causal_lm(num_hidden_layers=2), masks={0: {"units": torch.tensor([False, False])}})
    with pytest.raises(ValueError, match="unit mask"):
        compact(tiny_causal_lm(num_hidden_layers=2), masks={0: {"units": torch.tensor([True, False, True])}})
    # a plain (or uniformly compacted) folder has a stock config: load_compacted defers to from_pretrained
    tiny_causal_lm(num_hidden_layers=2).save_pretrained(tmp_path / "plain")
    assert compacted_shapes(load_compacted(tmp_path / "plain")) is None
    model = get_peft_model(tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(structure="unstructured"))
    model.base_model.element_layers()["model.layers.0.mlp.up_proj"].set_element_mask(
        "default", torch.rand(128, 64) > 0.5
    )
    with pytest.raises(ValueError, match="element-wise"):
        compact(model, masks={0: {"channels": torch.arange(128) < 64}})


def test_compact_uses_public_tuner_api_and_the_tuner_does_not_import_pruning():
    import ast
    from pathlib import Path

    import prune_peft.pruning.structured as structured
    import prune_peft.tuners.loraprune as loraprune

    tree = ast.parse(Path(structured.__file__).read_text())
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_pp")]
    assert private == []  # compact() reaches the tuner and its layers through public methods only
    for path in Path(loraprune.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "pruning" not in (node.module or ""), f"{path.name} imports {node.module}: an import cycle"


# ------------------------------------------------------------------------------------------------ uniform=True


def _uniform_trained(arch="llama", multiple=16, sparsity=0.5, steps=4):
    model = get_peft_model(
        tiny_causal_lm(arch, num_hidden_layers=3),
        LoRAPruneConfig(
            r=4,
            target_sparsity=sparsity,
            uniform=True,
            channel_multiple=multiple,
            schedule_steps=steps,
            warmup=0.0,
            cooldown=0.0,
            prune_every=1,
        ),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_uniform_loraprune_compacts_to_a_stock_checkpoint(arch, tmp_path):
    model = _uniform_trained(arch, multiple=16, sparsity=0.3)
    masks = model.base_model.get_masks()
    assert sorted(masks) == [0, 1, 2]  # no block excluded
    units = {int(m["units"].sum()) for m in masks.values()}
    channels = {int(m["channels"].sum()) for m in masks.values()}
    # 2 KV units: round(0.3 * 2) = 1 removed; 128 channels: 128 - 38 = 90 kept -> rounded to 96 (multiple of 16)
    assert units == {1} and channels == {96}
    assert len({tuple(m["channels"].tolist()) for m in masks.values()}) > 1  # chosen per block, not shared
    ids = _ids(7)
    masked = model(ids).logits
    small = compact(model.merge_and_unload())
    cfg = small.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (2, 1, 96, 16)
    assert compacted_shapes(small) is None and not hasattr(cfg, "prune_peft_layers")
    torch.testing.assert_close(small(ids).logits, masked, rtol=1e-5, atol=1e-5)
    save_compacted(small, tmp_path / "small")
    out = stock_reload(tmp_path / "small", ids)  # fresh process, prune_peft never imported
    torch.testing.assert_close(out["logits"], masked, rtol=1e-5, atol=1e-5)
    assert out["params"] == _n_params(small)


def test_uniform_channel_rounding_and_bad_settings():
    from prune_peft.tuners.loraprune.pruner import uniform_kept

    assert [uniform_kept(k, 128, 64) for k in (128, 127, 96, 95, 64, 20, 0)] == [128, 128, 128, 64, 64, 64, 64]
    assert uniform_kept(10, 40, 64) == 40  # a block narrower than the multiple is never pruned below its width
    assert LoRAPruneConfig(uniform=True).exclude_layers == []
    with pytest.raises(ValueError, match="exclude_layers"):
        LoRAPruneConfig(uniform=True, exclude_layers=[0])
    with pytest.raises(ValueError, match="channel_multiple"):
        LoRAPruneConfig(uniform=True, channel_multiple=0)
    with pytest.raises(ValueError, match="uniform"):
        LoRAPruneConfig(uniform=True, structure="2:4")


def test_non_uniform_compaction_is_refused_by_stock_from_pretrained(tmp_path):
    """Documented: per-layer sizes live in prune_peft_layers, which only load_compacted reads."""
    model = _pruned_peft()
    ids = _ids()
    masked = model(ids).logits
    small = compact(model.merge_and_unload())
    save_compacted(small, tmp_path / "small")
    torch.testing.assert_close(load_compacted(tmp_path / "small")(ids).logits, masked, rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    # stock from_pretrained builds full-size blocks from the one size in the config and refuses the weights
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "small")


def _state(model):
    """Every parameter and buffer (bitsandbytes' packed storage and quantization state included), cloned."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_unchanged(model, before, config_before):
    after = _state(model)
    assert after.keys() == before.keys()
    for name, t in after.items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert model.config.to_dict() == config_before
    assert not hasattr(model.config, "prune_peft_layers")


def test_compact_refuses_a_non_float_projection_before_any_change():
    model = tiny_causal_lm(num_hidden_layers=2)
    lin = model.model.layers[1].mlp.down_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach().mul(100).to(torch.int8), requires_grad=False)
    before, config = _state(model), model.config.to_dict()
    masks = {0: {"channels": torch.arange(128) < 64}, 1: {"units": torch.tensor([True, False])}}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj is quantized \(torch\.int8 weight\)"):
        compact(model, masks=masks)
    _assert_unchanged(model, before, config)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_compact_refuses_bitsandbytes_layers_adapted_or_not_before_any_change(quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm(seed=3, num_hidden_layers=2).save_pretrained(tmp_path)
    if quant == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    kind = {"nf4": r"bitsandbytes 4-bit nf4", "int8": r"bitsandbytes 8-bit LLM\.int8"}[quant]
    masks = {0: {"units": torch.tensor([True, False]), "channels": torch.arange(128) < 64}}

    # a plain quantized model: every projection is packed storage; before, compact sliced it as raw bytes
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32)
    before, config = _state(plain), plain.config.to_dict()
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.mlp\.down_proj.* quantized \({kind}") as err:
        compact(plain, masks=masks)
    assert "merge_and_unload()" in str(err.value) and "quant_method='bitsandbytes'" in str(err.value)
    _assert_unchanged(plain, before, config)
    with pytest.raises(ValueError, match="quantized"):  # zero-derived masks would read packed bytes too
        compact(plain)
    _assert_unchanged(plain, before, config)

    # LoRAPrune on q/k/v/gate/up only: o_proj and down_proj stay bare bitsandbytes layers
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32)
    cfg = LoRAPruneConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    pm = get_peft_model(base, cfg).eval()
    before, config = _state(pm), pm.base_model.model.config.to_dict()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj") as err:
        compact(pm, masks=masks)
    message = str(err.value)
    assert "model.layers.0.self_attn.o_proj" in message and "and 6 more" in message  # 14 projections, 8 named
    after = _state(pm)
    assert all(torch.equal(after[n], t) for n, t in before.items()) and after.keys() == before.keys()
    assert pm.base_model.model.config.to_dict() == config
