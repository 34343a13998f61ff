"""A failing get_peft_model of any of our adapter types leaves the model exactly as it was.

Module types, state_dict, ``peft_config`` and every parameter's ``requires_grad`` (peft's injection freezes the base)
are compared before/after.
"""

import pytest
import torch
from peft import get_peft_model
from reliability_testlib import assert_unchanged, prune24, snapshot

import prune_peft
from prune_peft.testing import tiny_causal_lm


def gpt2(n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=260, n_positions=64, bos_token_id=0)
    cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg)


def full_snapshot(model):
    return snapshot(model), [(n, p.requires_grad) for n, p in model.named_parameters()]


def assert_same(before, model):
    assert_unchanged(before[0], model)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before[1], "requires_grad changed"
    assert not any(type(m).__module__.startswith("peft") for m in model.modules()), "peft layers left injected"


def _lp(**kw):
    return prune_peft.LoRAPruneConfig(**{"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **kw})


# (case id, model factory, config factory, regex the error must match)
CASES = [
    (
        "loraprune-gpt2-head",
        lambda: gpt2(),
        lambda: prune_peft.LoRAPruneConfig(target_modules=["c_attn", "c_proj"], structure="head", exclude_layers=[]),
        r"structure='head'.*q_proj, k_proj and v_proj",
    ),
    (
        "loraprune-gpt2-default-exclusion",
        lambda: gpt2(1),
        lambda: prune_peft.LoRAPruneConfig(target_modules=["c_attn"], structure="head"),
        r"exclude_layers=\[0\] leaves none",
    ),
    ("loraprune-head-not-adapted", tiny_causal_lm, lambda: _lp(target_modules=["o_proj"], structure="head"), "q_proj"),
    ("loraprune-exclude-range", tiny_causal_lm, lambda: _lp(exclude_layers=[99]), r"exclude_layers \[99\]"),
    ("loraprune-all-heads", tiny_causal_lm, lambda: _lp(structure="head", target_sparsity=0.99), "every head"),
    (
        "sparselora-gpt2-conv1d",
        lambda: prune24(gpt2()),
        lambda: prune_peft.SparseLoraConfig(target_modules=["c_attn"], require_sparsity=False),
        r"cannot adapt Conv1D",
    ),
    (
        "spp-gpt2-conv1d",
        lambda: prune24(gpt2()),
        lambda: prune_peft.SPPConfig(target_modules=["c_attn"], require_sparsity=False),
        r"cannot adapt Conv1D",
    ),
    (
        "sparselora-unpruned",
        tiny_causal_lm,
        lambda: prune_peft.SparseLoraConfig(target_modules=["q_proj"]),
        "require_sparsity",
    ),
    (
        "spp-embedding",
        lambda: prune24(tiny_causal_lm()),
        lambda: prune_peft.SPPConfig(target_modules=["q_proj", "embed_tokens"]),
        "Embedding",
    ),
]


@pytest.mark.parametrize("make_model,make_config,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_failing_get_peft_model_leaves_the_model(make_model, make_config, match):
    model = make_model()
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, make_config())
    assert_same(before, model)
    assert not hasattr(model, "peft_config")


def test_loraprune_second_adapter_failure_keeps_the_first():
    pm = get_peft_model(tiny_causal_lm(), _lp(structure="head"))
    types = [(n, type(m)) for n, m in pm.named_modules()]
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match=r"exclude_layers \[99\]"):
        pm.add_adapter("second", _lp(exclude_layers=[99]))
    assert [(n, type(m)) for n, m in pm.named_modules()] == types
    assert sorted(pm.peft_config) == ["default"]
    assert all(torch.equal(v, sd[k]) for k, v in pm.state_dict().items()) and sd.keys() == pm.state_dict().keys()
