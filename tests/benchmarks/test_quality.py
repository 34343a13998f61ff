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
    # run once, not per seed: the LoRAPrune memory processes and the teacher's exact-match answers
    teacher_acc = quality.FULL["distill_acc_eval"] * quality.FULL["distill_acc_tokens"] * quality.GEN_S_PER_TOKEN
    once = {"loraprune": quality.MEMORY_S, "distill": teacher_acc}
    for k in one:
        assert three[k] - once.get(k, 0) == pytest.approx(3 * (one[k] - once.get(k, 0))) and one[k] > 0
    assert quality.QUICK["seeds"] == 1 and quality.FULL["seeds"] >= 3
    # the docstring's budget: the three fine-tuning comparisons add ≈ 71 min, the whole run ≈ 2 h 9 min
    added = sum(three[k] for k in ("loraprune", "recovery", "distill")) / 60
    assert 65 < added < 77 and 120 < sum(three.values()) / 60 < 135
    assert sum(quality.estimate_seconds(quality.QUICK, quality.PER_TOKEN_S).values()) / 60 < 10


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


def test_lora_rank_for_budget_matches_spp_parameter_count():
    # SmolLM2-135M's seven projections per block (hidden 576, 3 KV heads of 64, MLP 1536), 30 blocks
    block = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    r, lora, spp = quality.lora_rank_for_budget(block * 30, n_blocks=16)
    assert spp == 30 * sum(16 * din + dout for din, dout in block)
    assert r == 8 and lora == 8 * 30 * sum(din + dout for din, dout in block)
    assert abs(lora - spp) <= min(abs((r + d) * lora // r - spp) for d in (-1, 1))  # no nearer rank
    assert quality.lora_rank_for_budget([(10, 10)], n_blocks=1)[0] == 1  # never below rank 1
    with pytest.raises(ValueError, match="n_blocks"):
        quality.lora_rank_for_budget(block, n_blocks=0)
    with pytest.raises(ValueError, match="shapes"):
        quality.lora_rank_for_budget([], n_blocks=16)


def test_token_kl_matches_torch_kl_div_and_is_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    kl = quality.token_kl(t, s)
    assert kl.shape == (2, 5) and torch.allclose(kl, ref, atol=1e-6) and (kl > 0).all()
    assert torch.allclose(quality.token_kl(t, t), torch.zeros(2, 5), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        quality.token_kl(t, s[:, :4])


def test_window_kl_per_window(tiny_model):
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    tokens = torch.randint(3, 250, (3 * 16,), generator=torch.Generator().manual_seed(0))
    assert quality.window_kl(teacher, teacher, tokens, seqlen=16, windows=3) == pytest.approx([0.0] * 3, abs=1e-6)
    kl = quality.window_kl(teacher, student, tokens, seqlen=16, windows=3)
    with torch.no_grad():
        x = tokens[16:32][None]
        ref = quality.token_kl(teacher(input_ids=x).logits, student(input_ids=x).logits).mean().item()
    assert len(kl) == 3 and kl[1] == pytest.approx(ref, rel=1e-5) and min(kl) > 0
    with pytest.raises(ValueError, match="fewer than"):
        quality.window_kl(teacher, student, tokens, seqlen=16, windows=4)


def test_labelled_nll_matches_transformers_loss(tiny_model):
    model = tiny_model("llama")
    rows = [
        {"input_ids": [5, 9, 17, 33, 40, 41], "labels": [-100, -100, -100, 33, 40, 41]},
        {"input_ids": [7, 8, 9, 10], "labels": [-100, 8, 9, 10]},
    ]
    got = quality.labelled_nll(model, rows)
    for row, value in zip(rows, got):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.item()
        assert value == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="without labelled tokens"):
        quality.labelled_nll(model, [{"input_ids": [1, 2], "labels": [-100, -100]}])


def _two_four(model):
    from prune_peft.sparsity.masks import nm_mask

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.mul_(nm_mask(m.weight.abs(), 2, 4).to(m.weight.dtype))
    return model


def test_recovery_arms_budget_sparsity_and_remask(tiny_model):
    """Every recovery adapter trains on a 2:4 tiny base: equal trainable parameters (the budget rule), the sparse
    adapters keep every zero after merging, plain LoRA does not until re-masked."""
    base = _two_four(tiny_model("llama"))
    masks = quality.linear_masks(base)
    assert masks and all(m.float().mean() == 0.5 for m in masks.values())
    shapes = [(m.shape[1], m.shape[0]) for m in masks.values()]
    rank, lora_budget, spp_budget = quality.lora_rank_for_budget(shapes, quality.SPP_BLOCKS)
    batches = [torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    counts = {}
    for name, (make, lr) in quality.recovery_configs(rank).items():
        merged, counts[name] = quality._recovery_arm(base, batches, 0, make, lr)
        kept = all(not merged.get_submodule(n).weight[~m].any() for n, m in masks.items())
        if name == "LoRA merged + re-masked":
            assert not kept  # plain LoRA's merge fills the zeros
            quality.remask_(merged, masks)
            assert all(not merged.get_submodule(n).weight[~m].any() for n, m in masks.items())
        else:
            assert kept, name
    assert counts["SPP"] == spp_budget
    assert counts["SparseLoRA exact"] == counts["SparseLoRA lors"] == counts["LoRA merged + re-masked"] == lora_budget
    with pytest.raises(ValueError, match="does not have"):
        quality.remask_(base, {"nope": torch.ones(1, dtype=torch.bool)})


def test_report_renders_recovery_distill_and_loraprune_memory():
    arm = {"ppl": 20.0, "ppl_lo": 19.0, "ppl_hi": 21.0, "seeds": 3, "windows": 8}
    kl = {"mean": 0.1234, "lo": 0.1, "hi": 0.15, "seeds": 3, "windows": 8}
    diff = {"mean": -0.05, "lo": -0.08, "hi": -0.02, "verdict": "reproduces the paper's direction"}
    settings = {"seeds": 3, "eval_windows": 8, "eval_seqlen": 512}
    mem = {"peak_rss_mb": 1000.0, "model_rss_mb": 800.0, "training_mb": 200.0}
    q = {
        "model": "m",
        "comparisons": {
            "recovery": {
                "claim": "sparse adapters recover the gap",
                "budget": "equal trainable parameters: r = 8",
                "settings": settings,
                "dense": arm,
                "arms": {
                    "2:4 Wanda base (no recovery)": {**arm, "sparsity_after_merge": 0.5},
                    "SPP": {
                        **arm,
                        "sparsity_after_merge": 0.5,
                        "trainable_params": 2_500_000,
                        "gap_recovered": {"mean": 0.4, "lo": 0.3, "hi": 0.5},
                    },
                },
                "comparisons": {"SPP vs LoRA merged + re-masked": diff},
            },
            "distill": {
                "claim": "self-distillation forgets less",
                "settings": settings,
                "arms": {"KL to teacher: SFT on original responses": kl},
                "comparisons": {"self-distilled vs original (KL to teacher, held-out text)": diff},
            },
            "loraprune": {
                "claim": "LoRA-guided matches gradients",
                "settings": settings,
                "arms": {"LoRAPrune (importance=lora) @ 20%": {**arm, "params": 110_000_000}},
                "comparisons": {"20%: LoRAPrune vs full-gradient importance": diff},
                "memory": {
                    "shape": [2, 256],
                    "loraprune": mem,
                    "grad": {**mem, "peak_rss_mb": 1500.0, "training_mb": 700.0},
                    "ratios": {"peak_rss lora ÷ grad": 1000 / 1500},
                },
            },
        },
    }
    rec = report.SECTIONS["quality-recovery"]({"quality": q})
    assert "dense→pruned gap recovered" in rec and "0.40 [0.30, 0.50]" in rec and "2.50 M" in rec and "50.0%" in rec
    assert "Budget: equal trainable parameters: r = 8." in rec
    dist = report.SECTIONS["quality-distill"]({"quality": q})
    assert "value [95 % CI]" in dist and "0.1234 [0.1000, 0.1500]" in dist and "dense (unpruned)" not in dist
    lp = report.SECTIONS["quality-loraprune"]({"quality": q})
    assert "110.0 M" in lp and "| grad | 1500 MB | 800 MB | 700 MB |" in lp and "0.67×" in lp


@pytest.fixture
def tiny_context(tiny_model, tokenizer):
    """quality.Context holding a tiny llama (6 blocks) and the byte tokenizer instead of SmolLM2-135M."""
    from prune_peft.data import shakespeare_texts
    from prune_peft.evaluation import tokenize_stream

    settings = {
        **quality.QUICK,
        "eval_windows": 2,
        "eval_seqlen": 32,
        "loraprune_steps": 2,
        "loraprune_seqlen": 32,
        "recovery_steps": 2,
        "recovery_seqlen": 32,
        "recovery_calibration": [2, 32],
        "distill_drop": 2,
        "distill_train": 4,
        "distill_eval": 2,
        "distill_steps": 1,
        "distill_gen_tokens": 4,
    }
    ctx = quality.Context(settings)
    model = tiny_model("llama", num_hidden_layers=6, max_position_embeddings=1024).eval()
    heldout = tokenize_stream(shakespeare_texts("heldout"), tokenizer, max_tokens=2 * 32 + 1)
    ctx.__dict__["_loaded"] = (model, tokenizer, shakespeare_texts("train")[:200], heldout)  # the cached_property
    return ctx


def test_new_comparisons_run_end_to_end_on_a_tiny_model(tiny_context, monkeypatch):
    """loraprune, recovery and distill on a tiny model, one seed: the structure the report reads, and the
    invariants each comparison relies on (compacted sizes, zeros kept or restored, equal budgets)."""
    monkeypatch.setattr(quality, "loraprune_memory", lambda b, L, t: {"shape": [b, L], "stub": True})
    results = {name: quality.COMPARISONS[name](tiny_context) for name in ("loraprune", "recovery", "distill")}
    for r in results.values():
        assert r["claim"] and r["arms"] and r["comparisons"]
        for c in r["comparisons"].values():
            assert c["lo"] <= c["mean"] <= c["hi"] and c["verdict"]
    lp = results["loraprune"]
    assert len(lp["arms"]) == 6 and len(lp["comparisons"]) == 4 and lp["memory"]["shape"] == [2, 32]
    dense_params = sum(p.numel() for p in tiny_context.model.parameters())
    for name in quality.LORAPRUNE_ARMS:
        assert lp["arms"][f"{name} @ 50%"]["params"] < lp["arms"][f"{name} @ 20%"]["params"] < dense_params
    rec = results["recovery"]["arms"]
    for name in ("SparseLoRA exact", "SparseLoRA lors", "SPP", "LoRA merged + re-masked"):
        assert rec[name]["sparsity_after_merge"] == pytest.approx(
            rec["2:4 Wanda base (no recovery)"]["sparsity_after_merge"]
        )
        g = rec[name]["gap_recovered"]
        assert math.isfinite(g["mean"]) and g["lo"] <= g["hi"]
    assert rec["LoRA merged, not re-masked (dense again)"]["sparsity_after_merge"] < 0.1
    assert rec["SPP"]["trainable_params"] > 0 and (
        rec["SparseLoRA exact"]["trainable_params"] == rec["LoRA merged + re-masked"]["trainable_params"]
    )
    dist = results["distill"]
    assert set(dist["arms"]) >= {"KL to teacher: pruned, no fine-tuning", "task NLL: unpruned teacher"}
    assert dist["arms"]["KL to teacher: pruned, no fine-tuning"]["mean"] > 0
    assert dist["layer_drop"] and dist["distill_stats"]
    text = report.SECTIONS["quality-recovery"]({"quality": {"comparisons": results}})
    assert "SparseLoRA exact" in text and "gap recovered" in text
