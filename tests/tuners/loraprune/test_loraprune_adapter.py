"""The LORAPRUNE adapter type: registration, masks, exact forward/merge, save/load, bad input."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

import prune_peft
from prune_peft import LoRAPruneConfig
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners.loraprune import LoRAPruneLinear


def _ids(seed=0):
    return torch.randint(3, 259, (2, 14), generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft(arch="llama", seed=0, **cfg):
    base = tiny_causal_lm(arch, seed=seed, num_hidden_layers=cfg.pop("layers", 3))
    model = get_peft_model(base, LoRAPruneConfig(r=4, exclude_layers=cfg.pop("exclude_layers", []), **cfg))
    _randomize_lora(model)
    return model.eval()


def test_importing_prune_peft_registers_the_type():
    assert PeftType.LORAPRUNE.value == "LORAPRUNE"
    assert prune_peft.LoRAPruneConfig is LoRAPruneConfig
    cfg = LoRAPruneConfig()
    assert cfg.peft_type == PeftType.LORAPRUNE and cfg.target_sparsity == 0.5 and cfg.structured


def test_default_exclusion_is_first_tenth_and_last_block():
    from prune_peft.tuners.loraprune import default_excluded_layers

    assert default_excluded_layers(30) == [0, 1, 2, 29]
    assert default_excluded_layers(4) == [3]
    model = get_peft_model(tiny_causal_lm(num_hidden_layers=4), LoRAPruneConfig(r=2))
    assert [b.prunable for b in model.base_model.prune_blocks()] == [True, True, True, False]
    # excluded blocks get no masks
    assert model.base_model.prune_blocks()[3].layers["q_proj"].row_mask("default") is None


def _zero_unit_and_channels(model, block, unit, channels):
    """Oracle: the same pruning done by zeroing rows of the *merged dense* weights by hand."""
    attn = model.model.layers[block].self_attn
    hd, group = 16, 2  # hidden 64 / 4 heads; 4 q heads over 2 KV heads
    with torch.no_grad():
        attn.q_proj.weight[unit * group * hd : (unit + 1) * group * hd] = 0
        attn.k_proj.weight[unit * hd : (unit + 1) * hd] = 0
        attn.v_proj.weight[unit * hd : (unit + 1) * hd] = 0
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            if lin.bias is not None:
                rows = lin.weight.abs().sum(1) == 0
                lin.bias[rows] = 0
        mlp = model.model.layers[block].mlp
        mlp.gate_proj.weight[channels] = 0
        mlp.up_proj.weight[channels] = 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_masked_forward_equals_hand_zeroed_merged_weights(arch):
    model = _peft(arch)
    ids = _ids()
    units = torch.tensor([False, True])
    channels = torch.ones(128, dtype=torch.bool)
    channels[[0, 5, 77, 127]] = False
    model.base_model.set_block_masks(1, units=units, channels=channels)
    masked = model(ids).logits
    # oracle: W + s·B A by hand on a fresh copy with the same LoRA weights (plain torch, not the merge under test),
    # then zero rows by hand
    other = _peft(arch)
    with torch.no_grad():
        for layer in other.modules():
            if isinstance(layer, LoRAPruneLinear):
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                layer.get_base_layer().weight.add_(layer.scaling["default"] * B @ A)
    dense = other.unload()  # peft's unload: drops the LoRA layers without merging
    _zero_unit_and_channels(dense, 1, 0, ~channels)
    torch.testing.assert_close(masked, dense(ids).logits, rtol=1e-5, atol=1e-5)
    # the mask changed the output (it is not a no-op)
    assert not torch.allclose(masked, _peft(arch)(ids).logits, atol=1e-4)


def test_masks_expand_to_q_k_v_rows_and_gate_up_rows():
    model = _peft()
    model.base_model.set_block_masks(0, units=torch.tensor([True, False]), channels=torch.arange(128) % 2 == 0)
    info = model.base_model.prune_blocks()[0]
    q = info.layers["q_proj"].row_mask("default")
    k = info.layers["k_proj"].row_mask("default")
    assert q[:32].all() and not q[32:].any()  # query heads 2, 3 share KV head 1
    assert k[:16].all() and not k[16:].any()
    assert torch.equal(info.layers["v_proj"].row_mask("default"), k)
    assert torch.equal(info.layers["up_proj"].row_mask("default"), torch.arange(128) % 2 == 0)
    got = model.base_model.get_masks()
    assert got[0]["units"].tolist() == [True, False] and int(got[0]["channels"].sum()) == 64
    with pytest.raises(ValueError, match="every head"):
        model.base_model.set_block_masks(0, units=torch.tensor([False, False]))
    with pytest.raises(ValueError, match="bool vector"):
        model.base_model.set_block_masks(0, units=torch.ones(3, dtype=torch.bool))


def test_merge_bakes_masks_and_unmerge_refuses():
    model = _peft("qwen2")  # q/k/v biases: a pruned row must lose its bias too
    ids = _ids()
    model.base_model.set_block_masks(2, units=torch.tensor([True, False]), channels=torch.arange(128) >= 10)
    masked = model(ids).logits
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be undone"):
        model.base_model.unmerge_adapter()
    merged = _peft("qwen2")
    merged.base_model.set_block_masks(2, units=torch.tensor([True, False]), channels=torch.arange(128) >= 10)
    plain = merged.merge_and_unload()
    assert not any(isinstance(m, LoRAPruneLinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, masked, rtol=1e-5, atol=1e-5)
    q = plain.model.layers[2].self_attn.q_proj
    assert not q.weight[32:].any() and not q.bias[32:].any()
    assert plain.prune_peft_masks[2]["units"].tolist() == [True, False]


def test_unpruned_adapter_merges_and_unmerges_like_lora():
    model = _peft()
    ids = _ids()
    out = model(ids).logits
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_save_and_load_restores_masks_and_outputs(tmp_path):
    model = _peft()
    ids = _ids()
    model.base_model.set_block_masks(1, units=torch.tensor([False, True]), channels=torch.arange(128) % 3 != 0)
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lora_prune_mask" in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_causal_lm(num_hidden_layers=3), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], LoRAPruneConfig)
    masks = loaded.base_model.get_masks()
    assert masks[1]["units"].tolist() == [False, True] and int((~masks[1]["channels"]).sum()) == 43
    torch.testing.assert_close(loaded(ids).logits, out)


def test_elementwise_structures_mask_weight_and_delta():
    for structure in ("unstructured", "2:4"):
        model = _peft(structure=structure)
        ids = _ids()
        layers = model.base_model.element_layers()
        assert len(layers) == 3 * 7
        g = torch.Generator().manual_seed(3)
        for layer in layers.values():
            if structure == "2:4":
                mask = torch.zeros(layer.out_features, layer.in_features // 4, 4, dtype=torch.bool)
                idx = torch.rand(mask.shape, generator=g).argsort(-1)[..., :2]
                mask.scatter_(-1, idx, True)
                mask = mask.reshape(layer.out_features, layer.in_features)
            else:
                mask = torch.rand(layer.out_features, layer.in_features, generator=g) > 0.3
            layer.set_element_mask("default", mask)
        masked = model(ids).logits
        # oracle: W ← M ⊙ (W + s·BA) by hand on a copy
        other = _peft(structure=structure)
        for name, layer in other.base_model.element_layers().items():
            mask = layers[name].element_mask("default")
            with torch.no_grad():
                base = layer.get_base_layer()
                delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                base.weight.copy_(mask * (base.weight + delta))
                layer.lora_B["default"].weight.zero_()
        torch.testing.assert_close(masked, other(ids).logits, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, masked, rtol=1e-5, atol=1e-5)
        w = merged.model.layers[0].mlp.down_proj.weight
        if structure == "2:4":
            assert prune_peft.sparsity.is_nm_sparse(w, 2, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(structure="blocks"), "structure"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(structure="2:4", target_sparsity=0.3), "contradicts"),
        (dict(structure="4:2"), "structure"),
        (dict(prune_every=0), "prune_every"),
        (dict(prune_every=-3), "prune_every"),
        (dict(importance="hessian"), "importance"),
        (dict(warmup=0.6, cooldown=0.5), "warmup"),
        (dict(schedule="exp"), "schedule"),
        (dict(use_dora=True), "use_dora"),
        (dict(initial_sparsity=0.7, target_sparsity=0.5), "initial_sparsity"),
        (dict(schedule_steps=0), "schedule_steps"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAPruneConfig(**kwargs)


def test_structure_the_model_cannot_express_raises_and_rolls_back():
    base = tiny_causal_lm(num_hidden_layers=2)
    ids = _ids()
    ref = base(ids).logits
    with pytest.raises(ValueError, match="k_proj"):
        get_peft_model(base, LoRAPruneConfig(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]))
    assert not any(isinstance(m, LoRAPruneLinear) for m in base.modules())  # injection undone
    torch.testing.assert_close(base(ids).logits, ref)
    # channel-only pruning does not need the attention projections
    model = get_peft_model(base, LoRAPruneConfig(structure="channel", target_modules=["gate_proj", "up_proj"]))
    assert set(model.base_model.get_masks()[0]) == {"channels"}


def test_target_that_removes_every_head_raises():
    mqa = tiny_causal_lm(num_hidden_layers=2, num_key_value_heads=1)  # one KV unit per layer
    with pytest.raises(ValueError, match="every head"):
        get_peft_model(mqa, LoRAPruneConfig(target_sparsity=0.5, exclude_layers=[]))
    with pytest.raises(ValueError, match="every head"):  # 2 units, 0.75 → rounds to 2
        get_peft_model(tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(target_sparsity=0.75, exclude_layers=[]))
    model = get_peft_model(mqa, LoRAPruneConfig(target_sparsity=0.5, structure="channel", exclude_layers=[]))
    assert model.base_model.prune_blocks()[0].intermediate == 128


def test_exclusion_errors():
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(exclude_layers=[5]))
    with pytest.raises(ValueError, match="leaves none"):
        get_peft_model(tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(exclude_layers=[0, 1]))
