"""Bad input: clear ValueErrors naming the field, raised before anything is modified."""

import pytest
import torch
from adapter_testlib import prune_linears
from peft import PeftModel, get_peft_model

import prune_peft  # noqa: F401
from prune_peft.tuners import SparseLoraConfig, SPPConfig, set_sparse_masks, sparse_layers


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (SparseLoraConfig, {"use_dora": True}, "use_dora"),
        (SparseLoraConfig, {"lora_bias": True}, "lora_bias"),
        (SparseLoraConfig, {"init_lora_weights": "pissa"}, "init_lora_weights"),
        (SparseLoraConfig, {"grad_mode": "fast"}, "grad_mode"),
        (SparseLoraConfig, {"require_sparsity": "yes"}, "require_sparsity"),
        (SPPConfig, {"n_blocks": 0}, "n_blocks"),
        (SPPConfig, {"forward_mode": "dense"}, "forward_mode"),
        (SPPConfig, {"on_indivisible": "pad"}, "on_indivisible"),
        (SPPConfig, {"init_lora_weights": "gaussian"}, "init_lora_weights"),
        (SPPConfig, {"use_dora": True}, "use_dora"),
    ],
)
def test_bad_config_values(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(target_modules="all-linear", **kwargs)


@pytest.mark.parametrize("cls", [SparseLoraConfig, SPPConfig])
def test_dense_target_rejected_and_nothing_changed(cls, pruned):
    model = pruned()
    dense = model.model.layers[1].mlp.down_proj
    dense.weight.data.normal_()  # one target module is not pruned
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*require_sparsity"):
        get_peft_model(model, cls(target_modules="all-linear"))
    assert_untouched(model, snap)
    # allowed when asked for
    pm = get_peft_model(model, cls(target_modules="all-linear", require_sparsity=False))
    assert "base_model.model.model.layers.1.mlp.down_proj" in sparse_layers(pm)


def test_unsupported_module_types(pruned):
    model = pruned()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"Embedding.*only\s+torch.nn.Linear"):
        get_peft_model(model, SparseLoraConfig(target_modules=["q_proj", "embed_tokens"], require_sparsity=False))
    assert_untouched(model, snap)

    class OddLinear(torch.nn.Linear):  # an nn.Linear holding integer (quantized) weights we cannot interpret
        pass

    odd = OddLinear(64, 64)
    odd.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    model.model.layers[0].self_attn.q_proj = odd
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"OddLinear.*int8.*Linear4bit"):
        get_peft_model(model, SPPConfig(target_modules="all-linear"))
    assert_untouched(model, snap)


def test_spp_indivisible_rows(pruned, ids):
    model = pruned(intermediate_size=120)  # 120 rows, 16 blocks
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"120 output rows.*n_blocks=16.*on_indivisible='uneven'"):
        get_peft_model(model, SPPConfig(target_modules="all-linear"))
    assert_untouched(model, snap)
    pm = get_peft_model(
        model, SPPConfig(target_modules="all-linear", on_indivisible="uneven", init_lora_weights=False)
    )
    with torch.no_grad():
        out = pm(ids).logits
        torch.testing.assert_close(pm.merge_and_unload()(ids).logits, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [SparseLoraConfig, SPPConfig])
def test_merge_after_base_changed_raises_before_touching_anything(cls, pruned, ids):
    pm = get_peft_model(pruned(), cls(target_modules="all-linear", init_lora_weights=False)).eval()
    layer = sparse_layers(pm)["base_model.model.model.layers.1.mlp.up_proj"]
    weight = layer.get_base_layer().weight
    weight.data[0, weight.data[0] != 0] = 0.0  # pruned further after injection
    snap = {n: m.get_base_layer().weight.clone() for n, m in sparse_layers(pm).items()}
    for merge in (pm.merge_and_unload, pm.merge_adapter, lambda: layer.merge()):
        with pytest.raises(ValueError, match=r"cannot merge adapter 'default'.*non-zero weights inside the mask"):
            merge()
        assert all(torch.equal(m.get_base_layer().weight, snap[n]) for n, m in sparse_layers(pm).items())
        assert not any(m.merged for m in sparse_layers(pm).values())
    weight.data[1, 0] = 1.0 if weight.data[1, 0] == 0 else weight.data[1, 0]  # and denser elsewhere
    with pytest.raises(ValueError, match="cannot merge"):
        pm.merge_and_unload()


@pytest.mark.parametrize("cls", [SparseLoraConfig, SPPConfig])
def test_loading_onto_a_base_with_a_different_mask(cls, pruned, tmp_path):
    pm = get_peft_model(pruned("2:4"), cls(target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    other = pruned("unstructured")  # same dense weights, different zeros
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"masks do not match this base model's zeros"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, snap)
    # loading as a second adapter into a model that has one: only the new adapter goes away
    host = get_peft_model(pruned("unstructured"), cls(target_modules="all-linear"))
    with pytest.raises(ValueError, match="do not match"):
        host.load_adapter(tmp_path, adapter_name="foreign")
    assert "foreign" not in host.peft_config
    assert all("foreign" not in layer.lora_A for layer in sparse_layers(host).values())


def test_set_sparse_masks_validates_everything_first(pruned, ids):
    pm = get_peft_model(pruned(), SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    name = "model.layers.0.self_attn.q_proj"
    layer = sparse_layers(pm)["base_model.model." + name]
    old = layer.sparse_mask().clone()
    with pytest.raises(ValueError, match=r"shape \(64, 32\), the weight is \(64, 64\)"):
        set_sparse_masks(pm, {name: torch.ones(64, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"drops .* non-zero weights"):
        set_sparse_masks(pm, {name: torch.zeros(64, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"no prune_peft adapter layer named .model\.nope."):
        set_sparse_masks(pm, {name: torch.ones(64, 64, dtype=torch.bool), "model.nope": torch.ones(1, 1)})
    assert torch.equal(layer.sparse_mask(), old)  # nothing written by the failed calls
    # a given mask may keep more than the base's non-zeros: the update then reaches those weights too
    wider = old.clone()
    wider[:, :8] = True
    set_sparse_masks(pm, {name: wider})
    assert torch.equal(layer.sparse_mask(), wider)
    delta = layer.get_delta_weight("default")
    assert bool((delta[~wider] == 0).all()) and bool((delta[wider & ~old] != 0).any())
    pm.eval()
    with torch.no_grad():
        out = pm(ids).logits
        torch.testing.assert_close(pm.merge_and_unload()(ids).logits, out, atol=1e-5, rtol=0)


def test_load_with_wrong_mask_shape(pruned, tmp_path):
    pm = get_peft_model(pruned(), SparseLoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    other = prune_linears(pruned(num_attention_heads=2, num_key_value_heads=2, head_dim=16))  # q_proj 32×64
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        PeftModel.from_pretrained(other, tmp_path)
