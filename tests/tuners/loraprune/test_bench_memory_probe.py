"""benchmarks/loraprune.py's MemoryProbe: the importance gradients alive at the scoring point, read from the tensors,
and the per-phase peak RSS; plus the agreement diagnostic's rank helpers."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "callbacks"))
import loraprune as bench  # noqa: E402
from prune_testlib import loraprune_model, token_rows  # noqa: E402


def _probed_run(importance: str) -> tuple[dict, torch.nn.Module]:
    from prune_peft import PruneCallback

    model = loraprune_model(target_sparsity=0.5, prune_every=1, warmup=0.0, importance=importance)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-3)
    probe = bench.memory_probe(model, importance)
    bench._train(model, [lambda: probe, PruneCallback], token_rows(4), batch=2, steps=2, optimizer=opt)
    return probe.summary(), model


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def test_grad_mode_probe_sees_the_base_gradients_before_the_pruner_drops_them():
    summary, model = _probed_run("grad")
    scored = [
        layer.get_base_layer().weight
        for b in model.base_model.prune_blocks()
        if b.prunable
        for layer in b.layers.values()
    ]
    # the pruner unfreezes exactly the scored base weights; their float32 gradients were alive when it scored
    assert summary["importance_grad_mb"] == pytest.approx(_mb(scored))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert summary["live_grad_mb"] == pytest.approx(_mb(scored) + _mb(lora))
    assert all(W.grad is None for W in scored)  # ... and dropped them after scoring: the probe ran first
    assert summary["rss_at_scoring_mb"] > 0


def test_lora_mode_probe_counts_only_the_lora_gradients_and_records_phase_peaks():
    summary, model = _probed_run("lora")
    lora = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert _mb(lora) > 0 and summary["importance_grad_mb"] == pytest.approx(_mb(lora))
    assert summary["live_grad_mb"] == pytest.approx(summary["importance_grad_mb"])  # no base gradients
    if "phase_peak_rss_mb" in summary:  # Linux with a writable /proc/self/clear_refs
        peaks = summary["phase_peak_rss_mb"]
        assert set(peaks) == {"setup", "forward", "backward", "update", "other"}
        assert all(v > 0 for v in peaks.values())
        assert summary["peak_rss_mb"] == max(peaks.values()) and summary["peak_phase"] in peaks
        assert summary["training_peak_rss_mb"] == max(peaks[p] for p in ("forward", "backward", "update", "other"))


def test_rank_helpers():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert bench._spearman(x, x * 10) == pytest.approx(1.0)
    assert bench._spearman(x, -x) == pytest.approx(-1.0)
    assert bench._bottom_overlap(x, x, 0.5) == 1.0
    assert bench._bottom_overlap(-x, x, 0.5) == 0.0
