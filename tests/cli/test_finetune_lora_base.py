"""`finetune --method lora`: a warning on a pruned base (plain LoRA's merge fills the zeros), none on a dense one;
the adapter records the model id the user gave (the embedded alias's Hub id), never a local cache path."""

import json
import warnings

import pytest

from prune_peft.cli import main
from prune_peft.cli.eval import EMBEDDED_HUB_IDS, load_any, local_model_source, public_model_id
from prune_peft.cli.finetune import warn_dense_lora_on_sparse_base


def _finetune(model, out, method="lora"):
    argv = ["finetune", "--model", str(model), "--method", method, "--n-train", "8", "--n-eval", "0"]
    argv += ["--max-steps", "1", "--batch-size", "4", "--max-length", "96", "--out", str(out)]
    return main(argv)


@pytest.fixture
def folders(tiny_model, tokenizer, tmp_path):
    dense = tmp_path / "dense"
    tiny_model(num_hidden_layers=2).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    argv = ["prune", "--model", str(dense), "--method", "magnitude", "--eval-windows", "0"]
    assert main([*argv, "--pattern", "2:4", "--out", str(tmp_path / "2of4")]) == 0
    assert main([*argv, "--sparsity", "0.35", "--out", str(tmp_path / "u35")]) == 0
    assert main([*argv, "--sparsity", "0.1", "--out", str(tmp_path / "u10")]) == 0
    return tmp_path


@pytest.mark.parametrize(
    "base, warned", [("2of4", "2:4-sparse"), ("u35", "35% zeros"), ("u10", None), ("dense", None)]
)
def test_lora_on_a_sparse_base_warns_and_points_to_sparse_methods(folders, capsys, base, warned):
    out = folders / f"out_{base}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _finetune(folders / base, out) == 0
    ours = [str(w.message) for w in caught if "--method lora on a pruned base" in str(w.message)]
    report = json.loads((out / "finetune_report.json").read_text())
    if warned is None:
        assert not ours and "warning" not in report
    else:
        assert len(ours) == 1 and warned in ours[0]
        assert "--method sparse_lora" in ours[0] and "--method spp" in ours[0]
        assert report["warning"] == ours[0]


def test_sparse_methods_do_not_get_the_lora_warning(folders):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _finetune(folders / "2of4", folders / "sl", method="sparse_lora") == 0
    assert not [w for w in caught if "pruned base" in str(w.message)]


def test_threshold_is_thirty_percent_zeros(tiny_model):
    import torch

    model = tiny_model(num_hidden_layers=1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.reshape(-1)[: int(0.29 * m.weight.numel())] = 0
    assert warn_dense_lora_on_sparse_base(model) is None
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.reshape(-1)[: int(0.31 * m.weight.numel()) + 1] = 0
    with pytest.warns(UserWarning, match="31% zeros"):
        assert warn_dense_lora_on_sparse_base(model) is not None


def test_adapter_records_the_model_argument_not_a_cache_path(folders):
    out = folders / "rec"
    assert _finetune(folders / "dense", out) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(folders / "dense")
    card = (out / "README.md").read_text()
    assert "base_model: ''" not in card and "base_model:adapter:'" not in card


def test_embedded_alias_maps_to_its_hub_id_and_back():
    assert public_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct" == EMBEDDED_HUB_IDS["smollm2-135m"]
    assert local_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert public_model_id("/my/folder") == local_model_source("/my/folder") == "/my/folder"


def test_finetune_on_the_embedded_model_records_the_hub_id_and_eval_reads_it(tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = ["finetune", "--method", "lora", "--n-train", "4", "--n-eval", "0", "--max-steps", "1"]
    assert main([*argv, "--batch-size", "2", "--max-length", "64", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model, _tok, kind = load_any(str(out))  # offline: the embedded copy the adapter was trained on
    assert kind == "adapter" and model.peft_config["default"].base_model_name_or_path == cfg["base_model_name_or_path"]
