"""Bad inputs: each is refused with a ValueError naming the argument, before any work (the model is unchanged)."""

import copy

import pytest
import torch
from reliability_testlib import assert_unchanged, prune24, snapshot

import prune_peft
from prune_peft import prune
from prune_peft.testing import byte_tokenizer, tiny_causal_lm

TEXT = ["The quick brown fox jumps over the lazy dog. " * 8] * 4
IDS = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))

# (case id, prune() kwargs, regex the message must match: the argument's name and what is wrong)
PRUNE_CASES = [
    ("method", dict(method="bogus", sparsity=0.5), "method"),
    ("sparsity-high", dict(method="magnitude", sparsity=1.5), "sparsity"),
    ("sparsity-negative", dict(method="magnitude", sparsity=-0.1), "sparsity"),
    ("sparsity-missing", dict(method="magnitude", sparsity=None), "sparsity"),
    ("pattern", dict(method="magnitude", pattern="3:2"), "pattern|N:M|3:2"),
    ("pattern-garbage", dict(method="magnitude", pattern="two-four"), "pattern|two-four"),
    ("nsamples-zero", dict(method="wanda", sparsity=0.5, calibration=IDS, nsamples=0), "nsamples"),
    ("seqlen-zero", dict(method="wanda", sparsity=0.5, calibration=IDS, seqlen=0), "seqlen"),
    ("seqlen-negative", dict(method="wanda", sparsity=0.5, calibration=IDS, seqlen=-5), "seqlen"),
    ("seqlen-float", dict(method="wanda", sparsity=0.5, calibration=IDS, seqlen=8.0), "seqlen"),
    ("batch-size", dict(method="wanda", sparsity=0.5, calibration=IDS, batch_size=0), "batch_size"),
    ("include-str", dict(method="magnitude", sparsity=0.5, include="q_proj"), "include"),
    ("include-nomatch", dict(method="magnitude", sparsity=0.5, include=["*nothing*"]), "include"),
    ("exclude-nomatch", dict(method="magnitude", sparsity=0.5, exclude=["*nothing*"]), "exclude"),
    ("exclude-everything", dict(method="magnitude", sparsity=0.5, exclude=["*"]), "no linear layer"),
    ("calibration-missing", dict(method="wanda", sparsity=0.5), "calibration"),
    ("calibration-float", dict(method="wanda", sparsity=0.5, calibration=IDS.float()), "calibration.*integer"),
    ("calibration-bool", dict(method="wanda", sparsity=0.5, calibration=IDS > 5), "calibration.*integer"),
    ("calibration-vocab", dict(method="wanda", sparsity=0.5, calibration=IDS + 1000), r"calibration.*\[0, 260\)"),
    ("calibration-negative", dict(method="sparsegpt", sparsity=0.5, calibration=IDS - 300), "calibration.*ids"),
    ("calibration-1d", dict(method="wanda", sparsity=0.5, calibration=IDS[0]), "calibration|seqlen"),
    ("calibration-empty", dict(method="wanda", sparsity=0.5, calibration=IDS[:0]), "calibration|seqlen"),
    ("calibration-short", dict(method="wanda", sparsity=0.5, calibration=["abc"], seqlen=512), "seqlen=512"),
    ("tokenizer-missing", dict(method="wanda", sparsity=0.5, calibration=TEXT), "tokenizer"),
    ("scope", dict(method="magnitude", sparsity=0.5, scope="planet"), "scope"),
]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in PRUNE_CASES], ids=[c[0] for c in PRUNE_CASES])
def test_prune_refuses_before_any_weight_changes(fresh, kwargs, match):
    model = fresh()
    before = snapshot(model)
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("calibration"), list):
        kwargs["tokenizer"] = byte_tokenizer()
    if match == "tokenizer":
        kwargs.pop("tokenizer", None)
    with pytest.raises(ValueError, match=match):
        prune(model, **kwargs)
    assert_unchanged(before, model)


def test_prune_plain_module_named():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="model"):
        prune(model, method="wanda", sparsity=0.5, calibration=IDS)


def test_prune_gpt2_conv1d_names_the_layer_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260, n_positions=64))
    before = snapshot(model)
    with pytest.raises(ValueError, match="Conv1D"):
        prune(model, method="magnitude", sparsity=0.5)
    assert_unchanged(before, model)


def test_prune_dynamically_quantized_named():
    model = tiny_causal_lm(num_hidden_layers=1)
    qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"quantized|no torch.nn.Linear"):
        prune(qmodel, method="magnitude", sparsity=0.5)


# ---------------------------------------------------------------------------------------------- adapter configs

CONFIG_CASES = [
    ("sl-dora", "SparseLoraConfig", dict(use_dora=True), "use_dora"),
    ("sl-bias", "SparseLoraConfig", dict(lora_bias=True), "lora_bias"),
    ("sl-pissa", "SparseLoraConfig", dict(init_lora_weights="pissa"), "init_lora_weights"),
    ("sl-olora", "SparseLoraConfig", dict(init_lora_weights="olora"), "init_lora_weights"),
    ("sl-grad-mode", "SparseLoraConfig", dict(grad_mode="fast"), "grad_mode"),
    ("sl-require", "SparseLoraConfig", dict(require_sparsity="yes"), "require_sparsity"),
    ("sl-fan-in", "SparseLoraConfig", dict(fan_in_fan_out=True), "fan_in_fan_out"),
    ("spp-dora", "SPPConfig", dict(use_dora=True), "use_dora"),
    ("spp-pissa", "SPPConfig", dict(init_lora_weights="pissa"), "init_lora_weights"),
    ("spp-bias", "SPPConfig", dict(lora_bias=True), "lora_bias"),
]


@pytest.mark.parametrize("cls,kwargs,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_adapter_config_refuses(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(prune_peft, cls)(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("cls", ["SparseLoraConfig", "SPPConfig"])
def test_unpruned_base_refused_and_left_as_it_was(cls):
    model = tiny_causal_lm(num_hidden_layers=1)
    before = snapshot(model)
    from peft import get_peft_model

    with pytest.raises(ValueError, match="require_sparsity"):
        get_peft_model(model, getattr(prune_peft, cls)(target_modules=["q_proj"]))
    assert_unchanged(before, model)


@pytest.mark.parametrize("cls", ["SparseLoraConfig", "SPPConfig"])
def test_unsupported_target_type_refused_and_left_as_it_was(fresh, cls):
    from peft import get_peft_model

    model = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Embedding|cannot adapt|target"):
        get_peft_model(model, getattr(prune_peft, cls)(target_modules=["q_proj", "embed_tokens"]))
    assert_unchanged(before, model)


def test_set_sparse_masks_refuses_unknown_layer(fresh):
    from peft import get_peft_model

    pm = get_peft_model(fresh(), prune_peft.SparseLoraConfig(target_modules=["q_proj"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match="masks"):
        prune_peft.tuners.set_sparse_masks(pm, {"model.nope": torch.ones(1, 1)})
    assert_unchanged(before, pm)


# ------------------------------------------------------------------------------------------------- callbacks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="bogus"), "method"),
        (dict(nonsense=1), "nonsense"),
        (dict(target_sparsity=1.5), "target_sparsity"),
        (dict(method="magnitude", target_sparsity=-1), "target_sparsity"),
        (dict(prune_every=0), "prune_every"),
        (dict(warmup=-0.5), "warmup"),
    ],
    ids=["method", "unknown", "target-high", "target-negative", "prune-every", "warmup"],
)
def test_prune_callback_refuses(kwargs, match):
    from prune_peft.callbacks import PruneCallback

    with pytest.raises(ValueError, match=match):
        PruneCallback(**kwargs)


# ----------------------------------------------------------------------------------------------- output folders


def test_output_is_a_file(tmp_path):
    from prune_peft._io import check_output_dir

    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"out=.*not a folder"):
        check_output_dir(f)
    assert f.read_text() == "x"


def test_output_not_empty(tmp_path):
    from prune_peft._io import atomic_dir

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("old")
    with pytest.raises(ValueError, match="overwrite=True"), atomic_dir(tmp_path / "o"):
        pass
    assert (tmp_path / "o" / "keep").read_text() == "old"


@pytest.mark.parametrize("target", ["/proc/prune-peft-out", "/proc/self/prune-peft/out"])
def test_output_not_writable(target):
    from prune_peft._io import check_output_dir

    with pytest.raises(ValueError, match=r"not writable|cannot be created"):
        check_output_dir(target)


def test_output_parent_is_a_file(tmp_path):
    from prune_peft._io import check_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_output_dir(tmp_path / "file" / "out")


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./nope", "a/b/c", "bad name!", ""])
def test_model_source_named(spec):
    from prune_peft.models import load_model

    with pytest.raises(ValueError, match="model="):
        load_model(spec)


def test_model_folder_without_config(tmp_path):
    from prune_peft.models import load_model

    with pytest.raises(ValueError, match=r"config.json"):
        load_model(str(tmp_path))


def test_prune_report_roundtrip_kept():  # a valid call still works after all the checks
    model = prune24(tiny_causal_lm(num_hidden_layers=1))
    rep = prune(copy.deepcopy(model), method="wanda", sparsity=0.5, calibration=IDS, seqlen=32, nsamples=2)
    assert rep.sparsity > 0.4
