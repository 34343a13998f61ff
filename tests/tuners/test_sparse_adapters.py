"""SparseLoRA and SPP on tiny pruned models: exact forward, exact merges, save/load, multiple adapters, training."""

import copy
import json

import pytest
import torch
from adapter_testlib import prune_linears, zero_sets
from peft import LoraConfig, PeftModel, get_peft_model

import prune_peft  # noqa: F401  (registers the adapter types)
from prune_peft.sparsity import is_nm_sparse
from prune_peft.tuners import SparseLoraConfig, SPPConfig, dense_weight, sparse_layers

KINDS = {
    "sparse_lora": lambda **kw: SparseLoraConfig(r=4, target_modules="all-linear", **kw),
    "sparse_lora_lors": lambda **kw: SparseLoraConfig(r=4, target_modules="all-linear", grad_mode="lors", **kw),
    "spp": lambda **kw: SPPConfig(target_modules="all-linear", **kw),
    "spp_blockwise": lambda **kw: SPPConfig(target_modules="all-linear", forward_mode="blockwise", **kw),
}
MAIN = ["sparse_lora", "spp"]


def make(kind, **kw):
    return KINDS[kind](init_lora_weights=kw.pop("init_lora_weights", False), **kw)


def oracle_delta(layer, adapter="default"):
    """ΔW from the formulas of methods.md §2/§3, computed densely from the layer's parameters."""
    W = dense_weight(layer.get_base_layer()).float()
    s = layer.scaling[adapter]
    if isinstance(layer.peft_config if hasattr(layer, "peft_config") else None, SPPConfig) or layer.method == "spp":
        W_row, w_col = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        reps = layer.out_features // W_row.shape[0]
        return s * (W_row.repeat_interleave(reps, 0) * w_col) * W
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return (W != 0) * (s * (B @ A))


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_matches_dense_oracle_and_trains(kind, pruned, ids):
    model = pruned(seed=1)
    reference = copy.deepcopy(model)
    pm = get_peft_model(model, make(kind))
    # oracle: the same model with W + ΔW written densely
    for name, layer in sparse_layers(pm).items():
        ref_layer = reference.get_submodule(name.removeprefix("base_model.model."))
        ref_layer.weight.data += oracle_delta(layer).detach()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    # gradients reach every adapter parameter; base weights stay frozen
    pm.train()
    pm(ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("kind", MAIN)
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_merge_and_unload_is_exact_and_sparse(kind, pattern, pruned, ids):
    pm = get_peft_model(pruned(pattern), make(kind))
    before = zero_sets(pm)
    pm.eval()
    with torch.no_grad():
        unmerged = pm(ids).logits
    merged = pm.merge_and_unload()
    assert not sparse_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)
    after = zero_sets(merged)
    assert after.keys() == before.keys()
    for name in before:  # zero new non-zeros
        assert not bool((before[name] & ~after[name]).any()), name
    if pattern == "2:4":
        assert all(is_nm_sparse(m.weight, 2, 4) for n, m in merged.named_modules() if n in after)


@pytest.mark.parametrize("kind", MAIN)
def test_merge_unmerge_safe_merge_idempotent(kind, pruned, ids):
    pm = get_peft_model(pruned(), make(kind)).eval()
    base_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in sparse_layers(pm).items()}
    with torch.no_grad():
        out = pm(ids).logits
        pm.merge_adapter()
        torch.testing.assert_close(pm(ids).logits, out, atol=1e-5, rtol=0)
        pm.merge_adapter()  # idempotent: warns, changes nothing
        torch.testing.assert_close(pm(ids).logits, out, atol=1e-5, rtol=0)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(ids).logits, out, atol=1e-5, rtol=0)
        for name, layer in sparse_layers(pm).items():
            w = layer.get_base_layer().weight
            torch.testing.assert_close(w, base_weights[name], atol=1e-6, rtol=0)
            assert torch.equal(w == 0, base_weights[name] == 0)
        pm.base_model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(pm(ids).logits, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MAIN)
def test_unload_and_disable_give_back_the_base(kind, pruned, ids):
    model = pruned()
    with torch.no_grad():
        base_out = model(ids).logits
    pm = get_peft_model(model, make(kind)).eval()
    with torch.no_grad():
        assert not torch.allclose(pm(ids).logits, base_out)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(ids).logits, base_out)
        n_params = sum(p.numel() for p in pm.get_base_model().parameters())
        unloaded = pm.unload()
        torch.testing.assert_close(unloaded(ids).logits, base_out)
    assert sum(p.numel() for p in unloaded.parameters()) < n_params


@pytest.mark.parametrize("kind", MAIN)
def test_multiple_adapters(kind, pruned, ids):
    pm = get_peft_model(pruned(), make(kind)).eval()
    pm.add_adapter("other", make(kind))
    with torch.no_grad():
        out_default = pm(ids).logits
        pm.set_adapter("other")
        out_other = pm(ids).logits
        assert not torch.allclose(out_default, out_other)
        # both active at once: the updates add up (SPP: both scale the original W)
        pm.base_model.set_adapter(["default", "other"])
        both = pm(ids).logits
        pm.merge_adapter(["default", "other"])
        torch.testing.assert_close(pm(ids).logits, both, atol=1e-5, rtol=0)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(ids).logits, both, atol=1e-5, rtol=0)
        # mixed batches: each row with its own adapter
        mixed = pm(ids, adapter_names=["default", "other"]).logits
        torch.testing.assert_close(mixed[0], out_default[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[1], out_other[1], atol=1e-5, rtol=0)
    pm.delete_adapter("other")
    assert all("other" not in layer.lora_sparse_mask for layer in sparse_layers(pm).values())
    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, out_default, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MAIN)
def test_save_load_roundtrip_with_masks_and_card(kind, pruned, ids, tmp_path):
    pm = get_peft_model(pruned(seed=3), make(kind)).eval()
    pm.add_adapter("second", make(kind))
    with torch.no_grad():
        out = pm(ids).logits
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == {"sparse_lora": "SPARSE_LORA", "spp": "SPP"}[kind]
    from safetensors.torch import load_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    masks = {k: v for k, v in state.items() if "lora_sparse_mask" in k}
    assert masks and all(v.dtype == torch.uint8 for v in masks.values())
    assert not any("second" in k for k in state)  # only the saved adapter (peft < 0.21 needs our shim)
    card = (tmp_path / "README.md").read_text()
    assert "import prune_peft" in card and "sparsity pattern: 2:4" in card and "prune_peft" in card
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()

    loaded = PeftModel.from_pretrained(pruned(seed=3), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out)
    assert (
        type(loaded.peft_config["default"]).__name__ == {"sparse_lora": "SparseLoraConfig", "spp": "SPPConfig"}[kind]
    )
    for name, layer in sparse_layers(loaded).items():
        original = sparse_layers(pm)[name]
        assert torch.equal(layer.sparse_mask(), original.sparse_mask())
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert "second" in loaded.peft_config


def test_bf16_base_merge_keeps_zeros_and_matches_the_unmerged_forward(pruned, ids):
    model = pruned().to(torch.bfloat16)
    pm = get_peft_model(model, make("sparse_lora")).eval()
    before = zero_sets(pm)
    with torch.no_grad():
        out = pm(ids).logits
        merged = pm.merge_and_unload()  # round(W + ΔW) once: the unmerged forward adds ΔW unrounded
        torch.testing.assert_close(merged(ids).logits, out, atol=0.05, rtol=0.02)
    assert all(torch.equal(before[n], z) for n, z in zero_sets(merged).items())


def test_lora_dropout_and_rslora_work(pruned, ids):
    pm = get_peft_model(pruned(), make("sparse_lora", lora_dropout=0.1, use_rslora=True))
    layer = next(iter(sparse_layers(pm).values()))
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # lora_alpha / sqrt(r)
    pm.train()
    pm(ids, labels=ids).loss.backward()  # dropout active: base + masked branch path
    pm.eval()
    with torch.no_grad():
        out = pm(ids).logits
        torch.testing.assert_close(pm.merge_and_unload()(ids).logits, out, atol=1e-5, rtol=0)


def test_sparse_lora_update_stays_masked_through_training(pruned, ids):
    model = pruned()
    pm = get_peft_model(model, SparseLoraConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(3):
        pm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for layer in sparse_layers(pm).values():
        delta = layer.get_delta_weight("default")
        mask = layer.sparse_mask()
        assert bool((delta[~mask] == 0).all()) and delta.abs().sum() > 0
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(delta, 2.0 * (B @ A) * mask)  # ΔW = M ⊙ s·BA, s = 8/4


def test_spp_starts_as_identity_and_uses_n_blocks(pruned, ids):
    model = pruned()
    with torch.no_grad():
        base_out = model(ids).logits
    pm = get_peft_model(model, SPPConfig(target_modules="all-linear", n_blocks=8))
    layer = sparse_layers(pm)["base_model.model.model.layers.0.mlp.up_proj"]
    assert layer.lora_A["default"].weight.shape == (8, 64) and layer.lora_B["default"].weight.shape == (128, 1)
    assert bool((layer.lora_B["default"].weight == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, base_out)
    W = layer.get_base_layer().weight
    layer.lora_B["default"].weight.data.normal_()
    delta = layer.get_delta_weight("default")
    W_row, w_col = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    # ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W, s = 16/8
    torch.testing.assert_close(delta, 2.0 * (W_row.repeat_interleave(16, 0) * w_col) * W)


def test_trainer_and_sft_trainer(pruned, tokenizer, texts, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"text": [t[:200] for t in texts[:16]]})
    tok_ds = ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=48), batched=True, remove_columns=["text"]
    )
    common = dict(max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no", use_cpu=True)
    pm = get_peft_model(pruned(), SparseLoraConfig(r=4, target_modules="all-linear"))
    Trainer(
        model=pm,
        args=TrainingArguments(output_dir=str(tmp_path / "t"), **common),
        train_dataset=tok_ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    ).train()
    before = zero_sets(pm)
    merged = pm.merge_and_unload()
    assert all(torch.equal(before[n], z) or not bool((before[n] & ~z).any()) for n, z in zero_sets(merged).items())

    trainer = SFTTrainer(
        model=pruned(),
        args=SFTConfig(output_dir=str(tmp_path / "s"), max_length=48, **common),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=SPPConfig(target_modules="all-linear"),
    )
    trainer.train()
    assert type(trainer.model.peft_config["default"]).__name__ == "SPPConfig"
    assert sparse_layers(trainer.model)


def test_memory_saved_for_backward_is_near_plain_lora(pruned, ids):
    """Bytes kept alive for backward (unique storages) — SparseLoRA/SPP vs plain LoRA of the same rank."""

    def saved_bytes(cfg):
        pm = get_peft_model(prune_linears(pruned()), cfg)
        pm.train()
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        batch = ids.repeat(2, 2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(batch, labels=batch).loss
        loss.backward()
        return sum(seen.values())

    plain = saved_bytes(LoraConfig(r=4, target_modules="all-linear"))
    for cfg in (make("sparse_lora"), make("spp"), make("spp_blockwise")):
        assert saved_bytes(cfg) <= 1.05 * plain
