import math

import pytest
import torch

from prune_peft.evaluation import perplexity, sparsity_report


def _oracle_ppl(model, tokens, seqlen):
    """Disjoint windows; HF's own shifted cross-entropy per window, weighted by the scored-token count."""
    nll, count = 0.0, 0
    for b in range(0, tokens.numel() - 1, seqlen):
        ids = tokens[b : b + seqlen].unsqueeze(0)
        if ids.shape[1] < 2:
            break
        loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_perplexity_matches_hf_loss(tiny_model):
    model = tiny_model("llama")
    tokens = torch.randint(3, 260, (100,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _oracle_ppl(model, tokens, 32)
    got = perplexity(model, tokens=tokens, seqlen=32, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_strided_scores_each_token_once(tiny_model):
    """With overlap, the total scored-token count is the stream length − 1 and the stride=seqlen case agrees."""
    model = tiny_model("qwen2")
    tokens = torch.randint(3, 260, (70,), generator=torch.Generator().manual_seed(1))
    full_ctx = perplexity(model, tokens=tokens, seqlen=70)
    strided = perplexity(model, tokens=tokens, seqlen=40, stride=10)
    disjoint = perplexity(model, tokens=tokens, seqlen=40)
    assert strided != disjoint
    # tokens scored with more context in the strided run → closer to the single-window value
    assert abs(math.log(strided) - math.log(full_ctx)) <= abs(math.log(disjoint) - math.log(full_ctx)) + 1e-6


def test_perplexity_from_texts_and_max_windows(tiny_model, tokenizer):
    model = tiny_model("llama")
    p = perplexity(model, tokenizer, ["hello world " * 30], seqlen=16, max_windows=2)
    assert math.isfinite(p) and p > 1
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens=torch.arange(3, 40), seqlen=8, stride=9)
    with pytest.raises(ValueError, match="either tokens"):
        perplexity(model)


def test_sparsity_report_counts(tiny_model):
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w.view(-1, 4)[:, :2] = 0
    rep = sparsity_report(model)
    entry = rep["modules"]["model.layers.0.mlp.up_proj"]
    assert entry["zeros"] == w.numel() // 2 and entry["2:4_violations"] == 0
    assert rep["2:4_valid_modules"] == 1
    assert rep["zeros"] == w.numel() // 2
