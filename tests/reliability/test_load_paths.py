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


# ------------------------------------------------------------------ transformers' model.load_adapter: first forward

IDS = torch.tensor([[1, 2, 3, 4, 5]])


def _assert_refuses_to_run(model, match):
    """Forward, generate and merge all raise (naming the module), and keep raising: no output is ever produced."""
    for _ in range(2):
        with pytest.raises((ValueError, RuntimeError), match=match) as info:
            model(IDS)
        assert "model.layers.0.self_attn.q_proj" in str(info.value) or "model.layers." in str(info.value)
    with pytest.raises((ValueError, RuntimeError), match=match):
        model.generate(IDS, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("kind", ["tampered-mask", "truncated", "empty", "garbage", "missing-key"])
def test_transformers_load_adapter_broken_file_never_runs(saved, tmp_path, base24, kind):
    """transformers' load_adapter reads the file itself (no tuner hook between injection and loading): a broken or
    tampered file either raises at load or leaves layers that refuse their first forward; never an output."""
    path = _variant(saved, tmp_path, kind)
    model = copy.deepcopy(base24)
    try:
        _transformers_load_adapter(model, path)
    except Exception as exc:  # truncated / empty / garbage: transformers' own error, layers stay injected
        assert kind in ("truncated", "empty", "garbage"), f"{kind}: unexpected load error {exc!r}"
    match = r"tampered" if kind == "tampered-mask" else r"never loaded"
    _assert_refuses_to_run(model, match)


def test_transformers_load_adapter_base_changed_after_load(saved, base24):
    """A base whose zeros move after a good load (before the first forward) is refused at that forward."""
    model = copy.deepcopy(base24)
    _transformers_load_adapter(model, saved)
    q = model.model.layers[0].self_attn.q_proj.get_base_layer()
    with torch.no_grad():
        q.weight[q.weight == 0] = 0.5  # densify: the adapter's mask no longer covers the base
    _assert_refuses_to_run(model, r"does not fit")
    with pytest.raises(ValueError, match="does not fit"):
        model.model.layers[0].self_attn.q_proj.merge()


def test_transformers_load_adapter_good_file_runs_and_matches_peft(saved, base24):
    model = copy.deepcopy(base24)
    _transformers_load_adapter(model, saved)
    with torch.no_grad():
        got = model(IDS).logits
        want = PeftModel.from_pretrained(copy.deepcopy(base24), saved)(IDS).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not any(getattr(m, "_pp_pending", None) for m in model.modules()), "check stays armed after passing"


def test_peft_from_pretrained_disarms_on_load(saved, base24):
    """PeftModel.from_pretrained loads through torch's load_state_dict: the load replaces the -2 marker."""
    pm = PeftModel.from_pretrained(copy.deepcopy(base24), saved)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert int(layer.lora_sparse_nnz.get("default")) > 0
    pm(IDS)
    assert not layer._pp_pending


def test_fresh_adapter_from_saved_config_needs_digests_cleared(saved, base24):
    """get_peft_model with a config read from a saved folder (digests set) expects that folder's weights; with
    sparse_digests=None it is a new adapter and runs."""
    from peft import PeftConfig

    pm = get_peft_model(copy.deepcopy(base24), PeftConfig.from_pretrained(str(saved)))
    with pytest.raises(RuntimeError, match="never loaded"):
        pm(IDS)
    cfg = PeftConfig.from_pretrained(str(saved))
    cfg.sparse_digests = None
    get_peft_model(copy.deepcopy(base24), cfg)(IDS)


@pytest.mark.parametrize("path", ["peft", "transformers"])
def test_loaded_custom_mask_adapter_saves_and_loads_again(tmp_path, base24, path):
    """A mask that keeps more than the base's non-zeros (set_sparse_masks) survives load -> save -> load: the
    re-saved sparse_digests describe the loaded masks, not the base-derived ones the injection started with."""
    from prune_peft.tuners import set_sparse_masks

    cfg = prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base24), cfg)
    w = base24.model.layers[0].self_attn.q_proj.weight
    set_sparse_masks(pm, {"model.layers.0.self_attn.q_proj": torch.ones_like(w, dtype=torch.bool)})
    pm.save_pretrained(tmp_path / "first")
    if path == "peft":
        again = PeftModel.from_pretrained(copy.deepcopy(base24), tmp_path / "first")
    else:
        again = copy.deepcopy(base24)
        again.load_adapter(str(tmp_path / "first"))
    want = again(IDS).logits
    saved_digests = json.loads((tmp_path / "first" / "adapter_config.json").read_text())["sparse_digests"]
    assert again.peft_config["default"].to_dict()["sparse_digests"] == saved_digests
    if path == "transformers":
        return  # transformers' own adapter save needs peft >= 0.22
    again.save_pretrained(tmp_path / "second")
    third = PeftModel.from_pretrained(copy.deepcopy(base24), tmp_path / "second")
    assert torch.equal(third(IDS).logits, want)
    assert bool(third.base_model.model.model.layers[0].self_attn.q_proj.sparse_mask().all())
