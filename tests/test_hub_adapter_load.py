"""Loading a prune_peft adapter in a process that never imported prune_peft: what fails, what the card says, and
the one-line fix (``import prune_peft``) — checked in fresh interpreters. Cards of test models (no recorded base)
carry no empty base_model placeholders."""

import re
import subprocess
import sys

import pytest
import torch
import yaml
from peft import get_peft_model

import prune_peft
from prune_peft.sparsity import nm_mask
from prune_peft.testing import tiny_causal_lm

LOAD = """
import sys{extra}
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2])
print("loaded", type(model.peft_config["default"]).__name__)
"""


def _sparse_base(path):
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    model.save_pretrained(path)
    return model


def _front_matter(text):
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1)) or {}


def test_adapter_without_import_fails_with_the_type_the_card_names_and_loads_after_import(tmp_path):
    base = _sparse_base(tmp_path / "base")
    model = get_peft_model(base, prune_peft.SparseLoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    usage = card[card.index("```python") :]
    assert usage.splitlines()[1].startswith("import prune_peft")  # the first line of the usage block
    assert "KeyError: 'SPARSE_LORA'" in card

    def run(extra):
        args = [sys.executable, "-c", LOAD.format(extra=extra), str(tmp_path / "base"), str(tmp_path / "adapter")]
        return subprocess.run(args, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1"})

    bare = run("")
    assert bare.returncode != 0 and "KeyError: 'SPARSE_LORA'" in bare.stderr  # what the card warns about
    fixed = run("\nimport prune_peft")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "loaded SparseLoraConfig" in fixed.stdout


def test_card_of_a_model_without_recorded_base_has_no_empty_placeholders(tmp_path):
    base = _sparse_base(tmp_path / "unused")
    base.config._name_or_path = base.name_or_path = ""  # a test model built in memory: no Hub id, no path
    model = get_peft_model(base, prune_peft.SparseLoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta
    assert not any(t.startswith("base_model:") for t in meta["tags"])
    assert "base model: not recorded" in card and "`<base model>`" not in card


@pytest.mark.parametrize("base", ["/abs/local/cache/path", "me/tiny-2of4"])
def test_card_base_model_is_a_hub_id_never_a_local_path(tmp_path, base):
    model = _sparse_base(tmp_path / "unused")
    model.config._name_or_path = model.name_or_path = base
    peft_model = get_peft_model(model, prune_peft.SparseLoraConfig(r=4, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "adapter")
    meta = _front_matter((tmp_path / "adapter" / "README.md").read_text())
    if base.startswith("/"):
        assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    else:
        assert meta["base_model"] == base and f"base_model:adapter:{base}" in meta["tags"]


@pytest.mark.parametrize("uniform", [False, True])
def test_loraprune_adapter_card_says_import_prune_peft_and_where_the_compacted_model_loads(tmp_path, uniform):
    from prune_peft import LoRAPruneConfig

    base = tiny_causal_lm(num_hidden_layers=2)
    base.config.name_or_path = "me/tiny-dense"
    cfg = dict(channel_multiple=8) if uniform else {}
    model = get_peft_model(base, LoRAPruneConfig(r=2, target_sparsity=0.25, uniform=uniform, **cfg))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "import prune_peft" in text and "KeyError: 'LORAPRUNE'" in text
    assert "target sparsity 0.25" in text
    assert ("stock checkpoint" in text) is uniform and ("prune_peft.load_compacted" in text) is not uniform
    meta = yaml.safe_load(text.split("---")[1])
    assert "prune_peft" in meta["tags"] and "loraprune" in meta["tags"]
    model.save_pretrained(tmp_path)  # idempotent: one section
    assert (tmp_path / "README.md").read_text().count("Structured pruning adapter") == 1
