"""benchmarks/quality.py's pure helpers and its report sections (no benchmark run)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality
import report


def test_window_nll_matches_library_perplexity(tiny_model):
    from prune_peft import perplexity

    model = tiny_model("llama")
    tokens = torch.randint(3, 250, (5 * 16 + 3,), generator=torch.Generator().manual_seed(0))
    nll = quality.window_nll(model, tokens, seqlen=16, windows=5)
    assert len(nll) == 5
    ref = perplexity(model, tokens=tokens[: 5 * 16], seqlen=16, max_windows=5)
    assert math.exp(sum(nll) / 5) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        quality.window_nll(model, tokens[:20], seqlen=16, windows=5)


def test_summarize_and_compare():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.3, size=(3, 8))
    s = quality.summarize(base.tolist())
    assert s["ppl"] == pytest.approx(math.exp(base.mean())) and s["ppl_lo"] < s["ppl"] < s["ppl_hi"]
    c = quality.compare((base - 0.1).tolist(), base.tolist(), "lower")
    assert c["mean"] == pytest.approx(-0.1) and c["verdict"] == "reproduces the paper's direction"
    c = quality.compare((base + 0.1).tolist(), base.tolist(), "lower")
    assert c["verdict"] == "contradicts"


def test_estimate_is_positive_and_scales_with_seeds():
    one = quality.estimate_seconds({**quality.FULL, "seeds": 1}, quality.PER_TOKEN_S)
    three = quality.estimate_seconds(quality.FULL, quality.PER_TOKEN_S)
    assert set(one) == set(quality.COMPARISONS)
    for k in one:
        assert three[k] == pytest.approx(3 * one[k]) and one[k] > 0
    assert quality.QUICK["seeds"] == 1 and quality.FULL["seeds"] >= 3


def test_report_sections_render_results_and_missing():
    arm = {"ppl": 20.0, "ppl_lo": 19.0, "ppl_hi": 21.0, "seeds": 3, "windows": 8}
    q = {
        "model": "m",
        "comparisons": {
            "owl": {
                "claim": "OWL beats uniform",
                "settings": {"seeds": 3, "eval_windows": 8, "eval_seqlen": 512},
                "dense": arm,
                "arms": {"wanda 70% owl": arm},
                "comparisons": {
                    "wanda 70%: owl vs uniform": {"mean": -0.05, "lo": -0.08, "hi": -0.02, "verdict": "reproduces"}
                },
            }
        },
    }
    text = report.SECTIONS["quality-oneshot"]({"quality": q})
    assert "OWL beats uniform" in text and "20.00 [19.00, 21.00]" in text and "-0.0500 [-0.0800, -0.0200]" in text
    assert "*oneshot*: not measured yet — run `make bench`" in text  # the other comparison of the section
    assert "not measured yet — run `make bench`" in report.SECTIONS["quality-qtuning"]({"quality": None})


def test_hard_ste_baseline_is_top2of4_forward_and_identity_backward():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.05, 1.0, -2.0, 0.2, 0.0]], requires_grad=True)
    out = quality.HardSTE()(w)
    assert torch.equal(out.detach(), torch.tensor([[0.0, -0.5, 0.3, 0.0, 1.0, -2.0, 0.0, 0.0]]))
    g = torch.arange(8.0).reshape(1, 8)
    out.backward(g)
    assert torch.equal(w.grad, g)  # straight-through: pruned weights get their gradient too


def test_sste_arm_trains_and_tracks_flips():
    """One tiny S-STE arm for 3 steps: finite window NLLs, one flip fraction per step in [0, 1]."""
    st = {**quality.QUICK, "sste_steps": 3, "sste_batch": 2, "sste_seqlen": 16, "eval_windows": 2}
    train = torch.randint(4, 260, (2000,), generator=torch.Generator().manual_seed(0))
    held = torch.randint(4, 260, (40,), generator=torch.Generator().manual_seed(1))
    for arm in ("sste", "hard"):
        nll, flips = quality._train_tiny(arm, 0, st, train, held)
        assert len(nll) == 2 and all(math.isfinite(v) for v in nll)
        assert len(flips) == 3 and all(0 <= f <= 1 for f in flips)


def test_response_nll_matches_transformers_masked_loss(tiny_model, tokenizer):
    model = tiny_model("llama")
    rows = [{"prompt": "Q: two plus two?\n", "completion": "A: four #### 4"}, {"prompt": "Hi ", "completion": "there"}]
    got = quality.response_nll(model, tokenizer, rows, max_length=64)
    for row, value in zip(rows, got):
        ids = torch.tensor([tokenizer(row["prompt"] + row["completion"])["input_ids"]])
        labels = ids.clone()
        labels[0, : len(tokenizer(row["prompt"])["input_ids"])] = -100
        with torch.no_grad():
            ref = model(input_ids=ids, labels=labels).loss.item()
        assert value == pytest.approx(ref, rel=1e-5)
