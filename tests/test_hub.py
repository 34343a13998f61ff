"""Model cards, push_to_hub (with the Hub mocked) and exports of sparse adapters."""

import re
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prune_peft
from prune_peft.hub import export
from prune_peft.sparsity import nm_mask
from prune_peft.testing import tiny_causal_lm

sys.path.insert(0, str(Path(__file__).parent / "tuners"))
from adapter_testlib import zero_sets


def pruned_model(seed=0):
    model = tiny_causal_lm(seed=seed, num_hidden_layers=2)
    model.config._name_or_path = model.name_or_path = "me/tiny-2of4"
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    return model.eval()


CONFIGS = {
    "sparse_lora": lambda: prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "spp": lambda: prune_peft.SPPConfig(target_modules="all-linear", init_lora_weights=False),
}
IDS = torch.randint(0, 260, (2, 9), generator=torch.Generator().manual_seed(1))


def front_matter(text):
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_model_card_and_masks_on_save(kind, tmp_path):
    model = get_peft_model(pruned_model(), CONFIGS[kind]())
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "me/tiny-2of4"
    assert {"prune_peft", "sparse", kind.replace("_", "-"), "sparsity-2of4"} <= set(meta["tags"])
    assert "- base model: `me/tiny-2of4`" in card
    assert "- sparsity pattern: 2:4" in card and "sparsity ratio of the adapted weights: 0.5000" in card
    assert {"sparse_lora": "SparseLoRA (SQFT SparsePEFT)", "spp": "SPP"}[kind] in card
    assert "import prune_peft" in card and "PeftModel.from_pretrained" in card
    model.save_pretrained(tmp_path)  # saving again refreshes the section instead of duplicating it
    assert (tmp_path / "README.md").read_text().count("prune_peft:begin") == 1
    masks = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "sparse_mask" in k}
    assert len(masks) == 14 and all(v.dtype == torch.uint8 for v in masks.values())


class FakeHubApi:
    """Stands in for ``huggingface_hub.HfApi``: records the uploaded folder; optionally serves an existing card."""

    uploaded: ClassVar[dict] = {}
    existing_card: str | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def file_exists(self, repo_id, filename, revision=None):
        return filename == "README.md" and self.existing_card is not None

    def hf_hub_download(self, repo_id, filename, revision=None):
        path = Path(tempfile.mkdtemp()) / filename
        path.write_text(self.existing_card)
        return str(path)

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False):
        for f in Path(folder_path).rglob("*"):
            if f.is_file():
                FakeHubApi.uploaded[str(f.relative_to(folder_path))] = f.read_bytes()
        return "commit"


@pytest.mark.parametrize("existing", [None, "generic"])
def test_push_to_hub_uploads_masks_and_card(existing, tmp_path, monkeypatch):
    import huggingface_hub

    from prune_peft.hub import push_to_hub

    monkeypatch.setattr(FakeHubApi, "uploaded", {})
    if existing:  # a repository that already has a card: its text is kept, our section added
        data = huggingface_hub.ModelCardData(tags=["mine"], library_name="transformers")
        card = huggingface_hub.ModelCard.from_template(data, model_description="generic description")
        monkeypatch.setattr(FakeHubApi, "existing_card", str(card))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    model = get_peft_model(pruned_model(), CONFIGS["sparse_lora"]())
    assert push_to_hub(model, "me/x") == "commit"
    uploaded = FakeHubApi.uploaded
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    assert "Sparsity-preserving adapter (prune_peft)" in card and "import prune_peft" in card
    assert card.count("prune_peft:begin") == 1
    assert "prune_peft" in front_matter(card)["tags"]
    if existing:
        assert "generic description" in card
    (tmp_path / "w.safetensors").write_bytes(uploaded["adapter_model.safetensors"])
    assert any("lora_sparse_mask" in k for k in load_file(tmp_path / "w.safetensors"))


def test_push_to_hub_refuses_bad_input_before_any_upload(monkeypatch):
    import huggingface_hub

    from prune_peft.hub import push_to_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any Hub call would fail differently
    with pytest.raises(ValueError, match=r"push_to_hub expects a PeftModel.*model=LlamaForCausalLM"):
        push_to_hub(pruned_model(), "me/x")
    model = get_peft_model(pruned_model(), CONFIGS["spp"]())
    with pytest.raises(ValueError, match="repo_id must be a Hub repository id"):
        push_to_hub(model, "")


def test_no_library_method_is_patched_for_cards():
    """The card is written by the adapter config's own save path, not by wrapping peft/transformers methods."""
    from peft import PeftModel
    from transformers.utils.hub import PushToHubMixin

    assert "_upload_modified_files" not in PeftModel.__dict__
    assert PeftModel._upload_modified_files is PushToHubMixin._upload_modified_files


def test_merged_card_is_a_model_card():
    from prune_peft.hub import merged_card

    summary = {"sparsity": 0.5, "zeros": 8, "numel": 16, "modules": {"a": {}, "b": {}}, "2:4_valid_modules": 2}
    card = merged_card(summary, "me/base", ["sparse_lora"])
    meta = front_matter(str(card))
    assert meta == {"library_name": "transformers", "tags": ["prune_peft", "sparse", "sparse-lora"]}
    assert "- 2:4-valid linear layers: 2 of 2" in card.text and "`me/base`" in card.text


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_export_merged_is_a_plain_sparse_checkpoint(kind, tmp_path):
    model = get_peft_model(pruned_model(), CONFIGS[kind]()).eval()
    base_zeros = zero_sets(model)
    with torch.no_grad():
        expected = model(IDS).logits
    info = export(model, tmp_path / "merged", format="merged")
    assert info["sparsity"] > 0.3 and info["2:4_valid_modules"] == 14
    assert prune_peft.tuners.sparse_layers(model)  # the PeftModel itself is untouched
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(base_zeros[n], z) for n, z in zero_sets(loaded).items() if n in base_zeros)
    assert "sparse" in (tmp_path / "merged" / "README.md").read_text()


def test_export_lora_is_refused_for_masked_updates(tmp_path):
    model = get_peft_model(pruned_model(), CONFIGS["sparse_lora"]())
    with pytest.raises(ValueError, match=r"format='lora' needs plain LoRA.*SPARSE_LORA.*format='merged'"):
        export(model, tmp_path / "lora", format="lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match=r"format must be one of \('merged', 'lora', 'compacted'\)"):
        export(model, tmp_path / "x", format="gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite=True"):
        export(model, tmp_path / "full", format="merged")
    assert (tmp_path / "full" / "keep.txt").exists()


def test_export_lora_for_plain_lora(tmp_path):
    model = get_peft_model(pruned_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = model(IDS).logits
    export(model, tmp_path / "lora", format="lora")
    loaded = PeftModel.from_pretrained(pruned_model(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected)


def test_export_merged_from_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    pruned_model().save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, dtype=torch.float32)
    model = get_peft_model(base, CONFIGS["spp"]()).eval()
    zeros = zero_sets(model)
    with torch.no_grad():
        expected = model(IDS).logits
    export(model, tmp_path / "merged", format="merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(zeros[n], z) for n, z in zero_sets(loaded).items() if n in zeros)
