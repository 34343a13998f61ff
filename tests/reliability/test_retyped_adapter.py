"""An adapter_config.json edited to ``"peft_type": "LORA"`` over a prune_peft adapter folder is refused.

Stock peft / transformers refuse folders written with the ``target_parameters`` marker (SparseLoRA, SPP, LoRAPrune)
before anything is injected (``LoraConfig`` rejects a string there); every prune_peft entry point (CLI
eval/merge/export through ``load_any``, ``hub.stock_reload``, ``models.load_model``) refuses any retyped folder,
marker or not, before the base model loads.
"""

import copy
import json
import shutil

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from reliability_testlib import assert_unchanged, snapshot
from safetensors.torch import load_file

import prune_peft
import prune_peft.models as models
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners._registry import is_retype_guard, retyped_adapter_problem

CONFIGS = {
    "SPARSE_LORA": lambda: prune_peft.SparseLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    ),
    "SPP": lambda: prune_peft.SPPConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "LORAPRUNE": lambda: prune_peft.LoRAPruneConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], structure="head", init_lora_weights=False
    ),
}
X = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _prune_one_head(pm):
    """LoRAPrune masks with a zero (first head of block 0's q_proj), so a load that drops them changes the output."""
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    head_dim = pm.config.hidden_size // pm.config.num_attention_heads
    mask = torch.ones(q.out_features, dtype=torch.bool)
    mask[:head_dim] = False
    q.set_row_mask("default", mask)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, base24):
    out = {}
    for name, make in CONFIGS.items():
        d = tmp_path_factory.mktemp(name.lower())
        pm = get_peft_model(copy.deepcopy(base24), make())
        if name == "SPP":  # non-zero factors so a dense (plain LoRA) merge visibly fills zeros
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.normal_(0, 0.1)
        if name == "LORAPRUNE":
            _prune_one_head(pm)
        pm.save_pretrained(d)
        out[name] = d
    return out


def _retyped(src, tmp_path, peft_type="LORA", keep_marker=True):
    d = tmp_path / f"retyped-{peft_type}-{keep_marker}"
    shutil.copytree(src, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    if not keep_marker:  # a folder written before the marker existed
        cfg["target_parameters"] = None
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name", list(CONFIGS))
def test_writer_puts_the_marker_and_reads_it_back(folders, name):
    cfg = json.loads((folders[name] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == name and is_retype_guard(cfg["target_parameters"])
    assert f'"peft_type": "{name}"' in cfg["target_parameters"]
    loaded = PeftConfig.from_pretrained(str(folders[name]))
    assert type(loaded).__name__ == type(CONFIGS[name]()).__name__ and loaded.target_parameters is None
    assert retyped_adapter_problem(folders[name]) is None


STOCK_PATHS = {
    "PeftConfig.from_pretrained": lambda model, d: PeftConfig.from_pretrained(str(d)),
    "PeftModel.from_pretrained": lambda model, d: PeftModel.from_pretrained(model, d),
    "transformers-load_adapter": lambda model, d: model.load_adapter(str(d)),
}


@pytest.mark.parametrize("peft_type", ["LORA", "ADALORA"])
@pytest.mark.parametrize("path", list(STOCK_PATHS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stock_peft_refuses_retyped_folder_before_injection(folders, tmp_path, base24, name, path, peft_type):
    d = _retyped(folders[name], tmp_path, peft_type)
    model = copy.deepcopy(base24)
    before = snapshot(model)
    with pytest.raises(TypeError, match="target_parameters"):
        STOCK_PATHS[path](model, d)
    assert_unchanged(before, model)


def test_stock_peft_loads_a_markerless_retyped_folder_as_dense_lora(folders, tmp_path, base24):
    """What cannot be stopped: a folder without the marker (written before it, or the marker deleted too) loads
    as plain LoRA under stock peft, and a merge fills the pruned base's zeros (documented in docs/reliability.md).
    (SPP's block factors have other shapes than LoRA's: stock peft fails on them with a size mismatch.)"""
    d = _retyped(folders["SPARSE_LORA"], tmp_path, keep_marker=False)
    with pytest.warns(UserWarning, match="sparse_digests"):
        pm = PeftModel.from_pretrained(copy.deepcopy(base24), d)
    merged = pm.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert (base24.model.layers[0].self_attn.q_proj.weight == 0).any() and not (q == 0).any()
    assert retyped_adapter_problem(d) is not None  # ... which every prune_peft entry point refuses


@pytest.mark.parametrize("keep_marker", [True, False])
@pytest.mark.parametrize("peft_type", ["LORA", "VERA", "NOT_A_TYPE"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_entry_point_check_names_the_type(folders, tmp_path, name, peft_type, keep_marker):
    d = _retyped(folders[name], tmp_path, peft_type, keep_marker)
    problem = retyped_adapter_problem(d)
    assert problem and f'"peft_type": {peft_type!r}' in problem and f'Restore "peft_type": "{name}"' in problem


def test_entry_point_check_from_tensors_alone(folders, tmp_path):
    """Config fields stripped to plain LoRA's too: the mask tensors in the weights file still give it away."""
    d = _retyped(folders["SPARSE_LORA"], tmp_path, keep_marker=False)
    cfg = json.loads((d / "adapter_config.json").read_text())
    for key in ("sparse_digests", "require_sparsity", "grad_mode", "use_semi_structured"):
        cfg.pop(key)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    problem = retyped_adapter_problem(d)
    assert problem and "lora_sparse_mask" in problem and "SPARSE_LORA or SPP" in problem


def test_entry_point_check_loraprune(tmp_path):
    """A LoRAPrune folder without the marker (written before LoRAPruneConfig wrote it): entry points still refuse."""
    cfg = prune_peft.LoRAPruneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], structure="head")
    get_peft_model(tiny_causal_lm(num_hidden_layers=2), cfg).save_pretrained(tmp_path / "lp")
    d = _retyped(tmp_path / "lp", tmp_path, keep_marker=False)
    problem = retyped_adapter_problem(d)
    assert problem and "LORAPRUNE" in problem
    assert any(k.endswith("lora_prune_mask") for k in load_file(d / "adapter_model.safetensors"))


def test_plain_lora_folder_is_not_flagged(tmp_path, base24):
    from peft import LoraConfig

    get_peft_model(copy.deepcopy(base24), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert retyped_adapter_problem(tmp_path) is None
    assert retyped_adapter_problem(tmp_path / "missing") is None


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("the model was loaded before the retyped adapter was refused")

    monkeypatch.setattr(models, "load_model", tripwire)


@pytest.mark.parametrize("verb", ["eval", "merge", "export"])
def test_cli_refuses_retyped_adapter_before_loading(folders, tmp_path, capsys, no_model_load, verb):
    from prune_peft.cli import main

    d = _retyped(folders["SPARSE_LORA"], tmp_path, keep_marker=False)
    argv = {
        "eval": ["eval", "--model", "tiny-base", "--adapter", str(d)],
        "merge": ["merge", "--adapter", str(d), "--out", str(tmp_path / "out")],
        "export": ["export", "--adapter", str(d), "--out", str(tmp_path / "out"), "--format", "merged"],
    }[verb]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "\"peft_type\": 'LORA'" in err and 'Restore "peft_type": "SPARSE_LORA"' in err
    assert not (tmp_path / "out").exists()


def test_stock_reload_refuses_retyped_adapter(folders, tmp_path):
    from prune_peft.hub import stock_reload

    d = _retyped(folders["SPARSE_LORA"], tmp_path, keep_marker=False)
    with pytest.raises(ValueError, match=r'Restore "peft_type": "SPARSE_LORA"'):
        stock_reload(d)


def test_intact_loraprune_folder_round_trips(tmp_path, base24):
    """The marker changes nothing for the writer's own type: save_pretrained → PeftModel.from_pretrained (and
    transformers' load_adapter) give the saved model's outputs, its pruned head included."""
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base24), CONFIGS["LORAPRUNE"]())
    _prune_one_head(pm)
    pm.save_pretrained(tmp_path)
    assert is_retype_guard(json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(base24), tmp_path).eval()
    assert type(loaded.peft_config["default"]).__name__ == "LoRAPruneConfig"
    assert loaded.peft_config["default"].target_parameters is None
    via_transformers = copy.deepcopy(base24)
    via_transformers.load_adapter(str(tmp_path))
    with torch.no_grad():
        out = pm.eval()(X).logits
        unmasked = copy.deepcopy(pm)
        unmasked.base_model.model.model.layers[0].self_attn.q_proj.init_prune_mask("default", "rows")
        assert not torch.equal(unmasked(X).logits, out)  # the pruned head matters to the output
        assert torch.equal(loaded(X).logits, out)
        assert torch.equal(via_transformers.eval()(X).logits, out)


def _with_base(adapter, tmp_path, base24, weights: bool):
    """A folder with a model and an adapter in it: transformers' from_pretrained loads both."""
    d = tmp_path / f"model-and-{adapter.name}"
    shutil.copytree(adapter, d)
    base24.save_pretrained(d)
    if not weights:  # any base load would now fail with transformers' missing-weights error
        (d / "model.safetensors").unlink()
    return d


@pytest.mark.parametrize("layout", ["adapter-only", "model-and-adapter"])
@pytest.mark.parametrize("keep_marker", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_model_refuses_retyped_adapter_before_the_base_loads(
    folders, tmp_path, base24, name, keep_marker, layout
):
    """``models.load_model`` on a folder transformers would load an adapter from (itself or its base's folder)."""
    d = _retyped(folders[name], tmp_path, keep_marker=keep_marker)
    if layout == "model-and-adapter":
        d = _with_base(d, tmp_path, base24, weights=False)
    else:  # a base load would fail with transformers' "not a local folder / not a valid model identifier"
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "nope")}))
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ValueError, match=rf'"peft_type": \'LORA\'.*Restore "peft_type": "{name}"'):
        models.load_model(str(d))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files


def test_load_model_refuses_retyped_adapter_from_the_hub_cache(folders, tmp_path, monkeypatch):
    """A Hub id: the same adapter_config.json lookup transformers makes (here served from a local Hub cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = _retyped(folders["LORAPRUNE"], tmp_path, keep_marker=False)
    repo = tmp_path / "hub" / "models--someone--retyped-adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(d, repo / "snapshots" / ("0" * 40))
    with pytest.raises(ValueError, match=r'Restore "peft_type": "LORAPRUNE"'):
        models.load_model("someone/retyped-adapter", adapter_kwargs={"cache_dir": str(tmp_path / "hub")})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_model_with_intact_adapter_loads_it(folders, tmp_path, base24, name):
    d = _with_base(folders[name], tmp_path, base24, weights=True)
    model = models.load_model(str(d))
    ref = PeftModel.from_pretrained(copy.deepcopy(base24), folders[name]).eval()
    assert type(model.peft_config["default"]).__name__ == type(CONFIGS[name]()).__name__
    with torch.no_grad():
        assert torch.allclose(model(X).logits, ref(X).logits, atol=1e-5)
