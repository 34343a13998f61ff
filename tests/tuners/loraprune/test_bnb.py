"""LoRAPrune on bitsandbytes bases (nf4 4-bit with a bf16 compute dtype, LLM.int8 in a bf16 model), on CPU.

Oracles are plain torch from the formulas (methods.md §1, arXiv 2305.18403): the base weight de-quantized to fp32
(int8: ``W_int8 · SCB / 127``; nf4: bitsandbytes' ``dequantize_4bit``, the definition of the format), then
``Ĝ = G_B A + B G_A − G_B G_A``, ``I = |Ĝ ⊙ (Ŵ + s·BA)|``, ``Ī = (1 − β)·I`` after the first step, channel score
``Σ_role I/‖I‖`` (rows of gate/up, columns of down), and the merge ``rows ⊙ E ⊙ (Ŵ + s·BA)``. The forward of every
mask kind against the fp32 oracle is in tests/tuners/test_dtype_matrix.py (bases nf4 and int8).
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import prune_peft
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners.loraprune import LoRAPruneConfig, LoRAPruneLayer

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

BF16, FP32 = torch.bfloat16, torch.float32
ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KIND = {"nf4": "LoRAPruneLinear4bit", "int8": "LoRAPruneLinear8bitLt"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bnb")
    tiny_causal_lm(seed=11, num_hidden_layers=2).save_pretrained(path)
    return path


def load(checkpoint, quant: str, dtype=BF16):
    """nf4: compute dtype = ``dtype``; int8: the model (activations, norms) in ``dtype``."""
    if quant == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=q, dtype=dtype)


def adapt(checkpoint, quant, structure="channel", dtype=BF16, **cfg):
    torch.manual_seed(0)
    cfg.setdefault("target_sparsity", 0.5)
    config = LoRAPruneConfig(r=4, lora_alpha=8, target_modules=ROLES, structure=structure, **cfg)
    return get_peft_model(load(checkpoint, quant, dtype), config)


def dequantized(layer) -> torch.Tensor:
    """The quantized base weight in fp32: int8 from the LLM.int8 formula, nf4 through bitsandbytes' definition."""
    base = layer.get_base_layer()
    w = base.weight
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
        return w.data.float() * scb.float()[:, None] / 127.0
    assert not getattr(w.quant_state, "packing_format_for_cpu", False)  # read before any no-grad forward
    return bnbF.dequantize_4bit(w.data, w.quant_state).float()


def set_factors(pm, g: torch.Generator) -> None:
    """B ≠ 0 (peft initialises it to zero), so ΔW = s·BA and the importance's W + s·BA are non-trivial."""
    with torch.no_grad():
        for layer in layers(pm).values():
            layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g) * 0.2)
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.02)


def layers(pm) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoRAPruneLayer)}


def ids(n=2, t=12, seed=0):
    return torch.randint(0, 260, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bnb_layers_are_dispatched_to_loraprune_classes(checkpoint, quant):
    pm = adapt(checkpoint, quant, "head+channel")
    found = layers(pm)
    assert len(found) == 2 * len(ROLES)
    assert {type(m).__name__ for m in found.values()} == {KIND[quant]}
    assert repr(found["model.layers.0.mlp.up_proj"]).startswith("loraprune.")
    blocks = pm.base_model.prune_blocks()
    assert blocks[0].prunable and blocks[0].num_kv_heads == 2 and blocks[0].intermediate == 128


def test_bnb_classes_are_module_level_and_imported_lazily():
    from prune_peft.tuners.loraprune import bnb as lp_bnb
    from prune_peft.tuners.sparse_lora import bnb as sl_bnb

    for cls in (lp_bnb.LoRAPruneLinear4bit, lp_bnb.LoRAPruneLinear8bitLt):
        assert cls.__qualname__ == cls.__name__ and cls.__module__ == lp_bnb.__name__
    for cls in (sl_bnb.SparseLoraLinear4bit, sl_bnb.SparseLoraLinear8bitLt):
        assert cls.__qualname__ == cls.__name__ and cls.__module__ == sl_bnb.__name__
    code = (
        "import sys, prune_peft; "
        "bad = [m for m in ('prune_peft.tuners.loraprune.bnb', 'prune_peft.tuners.sparse_lora.bnb') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------------------------------- importance


def _lora_importance_oracle(layer, W):
    A, B = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    gA, gB = A.grad.float(), B.grad.float()
    A, B = A.detach().float(), B.detach().float()
    G = gB @ A + B @ gA - gB @ gA
    return (G * (W + layer.scaling["default"] * (B @ A))).abs()


@pytest.mark.parametrize("quant, structure", [("nf4", "unstructured"), ("nf4", "channel"), ("int8", "unstructured")])
def test_importance_equals_the_formula_on_the_dequantized_weight(checkpoint, quant, structure):
    pm = adapt(checkpoint, quant, structure)
    set_factors(pm, torch.Generator().manual_seed(1))
    W = {n: dequantized(m) for n, m in layers(pm).items()}
    pm.train()
    pm(ids(), labels=ids()).loss.backward()
    tuner = pm.base_model
    tuner.prepare_pruning(total_steps=20)
    tuner.update_importance(0)
    pruner = tuner.pruner()
    beta = pruner.settings["importance_beta"]
    if structure == "unstructured":
        assert set(pruner.importance) == {n for n in W if n.startswith("model.layers.0.")}
        for name, got in pruner.importance.items():
            want = (1 - beta) * _lora_importance_oracle(layers(pm)[name], W[name])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    else:
        parts = []
        for role, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
            name = f"model.layers.0.mlp.{role}"
            score = _lora_importance_oracle(layers(pm)[name], W[name]).sum(dim)
            parts.append(score / score.norm())
        want = (1 - beta) * sum(parts)
        torch.testing.assert_close(pruner.importance["c0"], want, rtol=1e-4, atol=1e-7)


# -------------------------------------------------------------------------------------------------- element masks


def test_nf4_element_mask_keeps_no_dense_tensor_for_the_backward(checkpoint):
    """Autograd holds the activations, the factors and the packed mask — nothing of size d_out × d_in — and the
    input gradient equals the oracle's ``g (E ⊙ (Ŵ + s·BA))``."""
    pm = adapt(checkpoint, "nf4", "unstructured")
    set_factors(pm, torch.Generator().manual_seed(2))
    layer = layers(pm)["model.layers.0.mlp.up_proj"]
    W = dequantized(layer)
    E = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    layer.set_element_mask("default", E)
    x = torch.randn(1, 8, layer.in_features, generator=torch.Generator().manual_seed(4)).to(BF16).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.dtype == BF16
    assert saved and max(saved) < W.numel() // 4, saved  # the packed mask is W.numel() / 8 bytes
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y.float() * g).sum().backward()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    Weff = E * (W + layer.scaling["default"] * (B @ A))
    want = g @ Weff
    rel = float((x.grad.float() - want).norm() / want.norm())
    assert rel < 2e-2, rel

    # the float layer's autograd keeps the dense masked weight: the check above can fail
    dense = get_peft_model(
        tiny_causal_lm(seed=11, num_hidden_layers=2), LoRAPruneConfig(r=4, structure="unstructured")
    )
    flayer = layers(dense)["model.layers.0.mlp.up_proj"]
    flayer.set_element_mask("default", E)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flayer(x.detach().float().requires_grad_())
    assert max(saved) >= W.numel()


# -------------------------------------------------------------------------------------------------------- training


def _train(checkpoint, quant, structure, dtype, steps=20):
    pm = adapt(checkpoint, quant, structure, dtype, prune_every=4, target_sparsity=0.25)
    tuner = pm.base_model
    tuner.prepare_pruning(total_steps=steps)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params and all(p.dtype == FP32 for p in params)
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = ids(2, 16)
    first = None
    for step in range(steps):
        loss = pm(batch, labels=batch).loss
        first = float(loss.detach()) if first is None else first
        loss.backward()
        tuner.update_importance(step)
        opt.step()
        tuner.update_and_allocate(step)
        opt.zero_grad()
    with torch.no_grad():
        final = float(pm(batch, labels=batch).loss)
    return first, final, tuner.pruner().metrics()


@pytest.mark.parametrize("quant, structure", [("nf4", "channel"), ("nf4", "unstructured"), ("int8", "channel")])
def test_twenty_steps_with_bf16_compute_track_fp32(checkpoint, quant, structure):
    """Same quantized weights, compute in fp32 vs bf16: LoRAPrune trains and prunes to the same loss (±3 %)."""
    start, ref, metrics = _train(checkpoint, quant, structure, FP32)
    assert ref < start - 0.05, (start, ref)
    key = "prune/mlp_sparsity" if structure == "channel" else "prune/sparsity"
    assert metrics[key] == pytest.approx(0.25, abs=0.02)
    _, final, metrics16 = _train(checkpoint, quant, structure, BF16)
    assert metrics16[key] == pytest.approx(0.25, abs=0.02)
    assert abs(final - ref) <= 0.03 * ref, (final, ref)


# --------------------------------------------------------------------------------------------- merge and refusals


@pytest.mark.parametrize("quant, structure", [("nf4", "channel"), ("nf4", "unstructured"), ("int8", "channel")])
def test_merge_and_unload_gives_the_masked_dequantized_weight(checkpoint, quant, structure):
    pm = adapt(checkpoint, quant, structure)
    g = torch.Generator().manual_seed(6)
    set_factors(pm, g)
    found = layers(pm)
    W = {n: dequantized(m) for n, m in found.items()}
    tuner = pm.base_model
    if structure == "channel":
        tuner.set_block_masks(0, channels=torch.rand(128, generator=g) > 0.5)
    else:
        for name, layer in tuner.element_layers().items():
            layer.set_element_mask("default", torch.rand(W[name].shape, generator=g) > 0.5)
    want = {}
    for name, layer in found.items():
        A, B = layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()
        merged = W[name] + layer.scaling["default"] * (B @ A)
        E, rows = layer.element_mask(), layer.row_mask()
        merged = merged if E is None else merged * E
        want[name] = (merged if rows is None else merged * rows[:, None], E, rows)
    pm.eval()
    with torch.no_grad():
        out = pm(ids()).logits.float()
    merged = pm.merge_and_unload()
    for name, (w, E, rows) in want.items():
        lin = merged.get_submodule(name)
        assert type(lin) is torch.nn.Linear and lin.weight.dtype == BF16, name
        torch.testing.assert_close(lin.weight.float(), w, rtol=2**-8, atol=1e-7)
        if E is not None:
            assert bool((lin.weight[~E] == 0).all())
        if rows is not None:
            assert bool((lin.weight[~rows] == 0).all())
    with torch.no_grad():
        again = merged(ids()).logits.float()
    torch.testing.assert_close(again, out, atol=0.1, rtol=0.05)  # bf16 merged weights vs the quantized forward
    if structure == "channel":  # unload first, then compact: the merged model is plain nn.Linear
        prune_peft.compact(merged)
        assert merged.model.layers[0].mlp.gate_proj.weight.shape[0] == int(
            want["model.layers.0.mlp.gate_proj"][2].sum()
        )
        with torch.no_grad():
            torch.testing.assert_close(merged(ids()).logits.float(), again, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_in_place_merge_compact_and_grad_importance_are_refused_before_any_change(checkpoint, quant):
    pm = adapt(checkpoint, quant)
    pm.base_model.set_block_masks(0, channels=torch.arange(128) % 2 == 0)
    found = layers(pm)
    before = {n: m.get_base_layer().weight.data.clone() for n, m in found.items()}
    shapes = {n: (m.out_features, m.in_features) for n, m in found.items()}
    with pytest.raises(ValueError, match="merge_and_unload"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match=r"bitsandbytes .* cannot be sliced"):
        prune_peft.compact(pm)
    with pytest.raises(ValueError, match="importance='grad'"):
        pm.base_model.prepare_pruning(total_steps=10, importance="grad")
    for name, layer in found.items():
        assert not layer.merged and torch.equal(layer.get_base_layer().weight.data, before[name]), name
        assert (layer.out_features, layer.in_features) == shapes[name]
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "base_layer" in n)


def test_int8_unload_without_a_forward_warns_and_uses_fp32(checkpoint):
    pm = adapt(checkpoint, "int8")
    with pytest.warns(UserWarning, match="has not run a forward pass"):
        merged = pm.merge_and_unload()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == FP32


# ------------------------------------------------------------------------------------------------------ save / load


def test_nf4_adapter_with_masks_round_trips(checkpoint, tmp_path):
    pm = adapt(checkpoint, "nf4", "unstructured")
    set_factors(pm, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    masks = {}
    for name, layer in pm.base_model.element_layers().items():
        masks[name] = torch.rand(layer.out_features, layer.in_features, generator=g) > 0.5
        layer.set_element_mask("default", masks[name])
    pm.eval()
    with torch.no_grad():
        out = pm(ids()).logits
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(load(checkpoint, "nf4"), tmp_path)
    got = again.base_model.element_layers()
    assert set(got) == set(masks)
    assert all(torch.equal(got[n].element_mask(), m) for n, m in masks.items())
    assert type(got[next(iter(got))]).__name__ == "LoRAPruneLinear4bit"
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, out, atol=0, rtol=0)


def test_oracle_dequantization_matches_the_layer(checkpoint):
    """The test's own int8/nf4 oracle reads the same weight the layer scores (guards the oracle, not the library)."""
    for quant in ("nf4", "int8"):
        pm = adapt(checkpoint, quant)
        layer = layers(pm)["model.layers.0.mlp.up_proj"]
        W = dequantized(layer)
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(9)).to(BF16)
        with torch.no_grad():
            y = layer.get_base_layer()(x).float()
        want = F.linear(x.float(), W)
        assert float((y - want).norm() / want.norm()) < 2e-2
