"""bitsandbytes bases (4-bit nf4/fp4, 8-bit) under SparseLoRA and SPP, QLoRA style, on CPU."""

import pytest
import torch
from adapter_testlib import prune_linears, zero_sets
from peft import get_peft_model

import prune_peft  # noqa: F401
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners import SparseLoraConfig, SPPConfig, dense_weight, sparse_layers

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

CONFIGS = {
    "sparse_lora": lambda: SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "spp": lambda: SPPConfig(target_modules="all-linear", init_lora_weights=False),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny24")
    prune_linears(tiny_causal_lm(seed=5, num_hidden_layers=2)).save_pretrained(path)
    return path


def load(checkpoint, quant: str, compute=torch.float32):
    if quant == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=cfg, dtype=torch.float32)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_base_trains_and_merges_to_a_sparse_dequantized_model(checkpoint, quant, kind, ids, tmp_path):
    pm = get_peft_model(load(checkpoint, quant), CONFIGS[kind]())
    layers = sparse_layers(pm)
    expected = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    assert all(type(layer).__name__.endswith(expected) for layer in layers.values())
    pm.train()
    pm(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)

    pm.eval()
    before = zero_sets(pm)  # zeros of the dequantized base
    with torch.no_grad():
        unmerged = pm(ids).logits
    merged = pm.merge_and_unload()
    linears = [m for n, m in merged.named_modules() if n in before]
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    after = zero_sets(merged)
    assert all(torch.equal(before[n], after[n]) for n in before)  # same zeros, none filled in
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)
    assert getattr(merged.config, "quantization_config", None) is None
    # the merged model is a plain sparse checkpoint any transformers user can load
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.equal(after[n], z) for n, z in zero_sets(reloaded).items())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_requantize_keeps_zeros(checkpoint, kind):
    pm = get_peft_model(load(checkpoint, "nf4"), CONFIGS[kind]())
    before = zero_sets(pm)
    merged = pm.merge_and_unload(requantize=True)
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    for name, zeros in before.items():
        now = dense_weight(merged.get_submodule(name)) == 0
        assert not bool((zeros & ~now).any()), name  # nf4 maps 0 to an exact 0


def test_bf16_compute_dtype_merges_to_bf16(checkpoint, ids):
    pm = get_peft_model(load(checkpoint, "nf4", compute=torch.bfloat16), CONFIGS["sparse_lora"]())
    before = zero_sets(pm)
    merged = pm.merge_and_unload()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(torch.equal(before[n], z) for n, z in zero_sets(merged).items())
    explicit = get_peft_model(load(checkpoint, "nf4", compute=torch.bfloat16), CONFIGS["spp"]())
    merged32 = explicit.merge_and_unload(dtype=torch.float32)
    assert merged32.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_mask_comes_from_the_dequantized_weight(checkpoint):
    pm = get_peft_model(load(checkpoint, "nf4"), CONFIGS["sparse_lora"]())
    for layer in sparse_layers(pm).values():
        assert torch.equal(layer.sparse_mask(), dense_weight(layer.get_base_layer()) != 0)


def test_spp_bnb_classes_are_module_level_dispatched_and_imported_lazily(checkpoint):
    import subprocess
    import sys

    from prune_peft.tuners.spp import bnb as spp_bnb

    for cls in (spp_bnb.SPPLinear4bit, spp_bnb.SPPLinear8bitLt):
        assert cls.__qualname__ == cls.__name__ and cls.__module__ == spp_bnb.__name__
    for quant, cls in (("nf4", spp_bnb.SPPLinear4bit), ("int8", spp_bnb.SPPLinear8bitLt)):
        layers = sparse_layers(get_peft_model(load(checkpoint, quant), CONFIGS["spp"]()))
        assert layers and all(type(layer) is cls for layer in layers.values())
        assert all(repr(layer).startswith("spp.") for layer in layers.values())
    # `import prune_peft` (which registers SPP) must not import the bitsandbytes layer modules
    mods = ("prune_peft.tuners.spp.bnb", "prune_peft.tuners.sparse_lora.bnb", "prune_peft.tuners.loraprune.bnb")
    code = f"import sys, prune_peft; bad = [m for m in {mods!r} if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
