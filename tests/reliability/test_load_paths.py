"""Every way an adapter reaches a model refuses a wrong base / broken file before any weight changes."""

import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from reliability_testlib import assert_unchanged, prune24, snapshot
from safetensors.torch import load_file, save_file

import prune_peft
from prune_peft.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base24):
    """An adapter folder saved from base24 (non-zero factors)."""
    out = tmp_path_factory.mktemp("adapter")
    cfg = prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base24), cfg).save_pretrained(out)
    return out


def _variant(saved, tmp_path, kind):
    d = tmp_path / kind
    shutil.copytree(saved, d)
    f = d / "adapter_model.safetensors"
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "garbage":
        f.write_bytes(b"\x00garbage" * 100)
    elif kind == "rank":
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["r"] = 8
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    elif kind == "tampered-mask":
        t = load_file(f)
        key = next(k for k in t if k.endswith("lora_sparse_mask"))
        t[key] = torch.full_like(t[key], 255)  # a mask that keeps everything: merges would fill zeros
        save_file(t, f)
    elif kind == "missing-key":
        t = load_file(f)
        t.pop(next(k for k in t if k.endswith("lora_B.weight")))
        save_file(t, f)
    return d


def _other_base():
    return prune24(tiny_causal_lm(num_hidden_layers=2, seed=1))  # same shapes, other zeros


def _from_pretrained(model, path):
    return PeftModel.from_pretrained(model, path)


def _transformers_load_adapter(model, path):
    model.load_adapter(str(path))


def _peft_load_adapter_new(model, path):
    model.load_adapter(path, adapter_name="other")


KINDS = ["other-base", "truncated", "empty", "garbage", "rank", "tampered-mask", "missing-key"]


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_refuses_and_leaves_base(saved, tmp_path, base24, kind):
    path = saved if kind == "other-base" else _variant(saved, tmp_path, kind)
    model = _other_base() if kind == "other-base" else copy.deepcopy(base24)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors|zeros"):
        _from_pretrained(model, path)
    assert_unchanged(before, model)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_load_adapter_refuses_and_leaves_model(saved, tmp_path, base24, kind):
    path = saved if kind == "other-base" else _variant(saved, tmp_path, kind)
    base = _other_base() if kind == "other-base" else copy.deepcopy(base24)
    pm = get_peft_model(base, prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors|zeros"):
        _peft_load_adapter_new(pm, path)
    assert_unchanged(before, pm)


def test_transformers_load_adapter_refuses_other_base(saved):
    model = _other_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match="zeros"):
        _transformers_load_adapter(model, saved)
    assert_unchanged(before, model)


def test_transformers_load_adapter_same_base_loads(saved, base24):
    model = copy.deepcopy(base24)
    _transformers_load_adapter(model, saved)
    assert any(".lora_A." in k for k in model.state_dict())


@pytest.mark.parametrize("kind", ["other-base", "rank"])
def test_set_state_dict_refuses_and_leaves_model(saved, tmp_path, base24, kind):
    """set_peft_model_state_dict / PeftModel.load_adapter into the existing adapter (the Trainer's resume path)."""
    base = _other_base() if kind == "other-base" else copy.deepcopy(base24)
    r = 8 if kind == "rank" else 4
    pm = get_peft_model(base, prune_peft.SparseLoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"zeros|shape"):
        set_peft_model_state_dict(pm, load_file(saved / "adapter_model.safetensors"))
    assert_unchanged(before, pm)
    with pytest.raises(ValueError, match=r"zeros|shape"):
        pm.load_adapter(saved, adapter_name="default", is_trainable=True)
    assert_unchanged(before, pm)


def test_saved_config_carries_digests(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SPARSE_LORA"
    assert set(cfg["sparse_digests"]) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert all(len(v) == 2 and all(len(h) == 16 for h in v) for v in cfg["sparse_digests"].values())


def test_digest_refused_when_base_changed_after_load_config(saved, base24):
    """A config carrying digests refuses a base whose zeros moved, even on get_peft_model (documented escape)."""
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(saved))
    model = _other_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match="sparse_digests"):
        get_peft_model(model, cfg)
    assert_unchanged(before, model)
    cfg.sparse_digests = None
    get_peft_model(model, cfg)  # the documented way to adapt a new base with the same settings
