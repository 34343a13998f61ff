"""Q-Tuning under DDP: 2 processes on gloo; every rank must apply one selection rule."""

import json
from pathlib import Path

import pytest
import torch
from ddp_testlib import run_two_ranks

from prune_peft.sparsity.qtuning import select_samples

WORKER = Path(__file__).with_name("qtuning_ddp_worker.py")


@pytest.mark.distributed
def test_two_ranks_apply_one_rule(tmp_path):
    run_two_ranks(WORKER, tmp_path)
    for mode, ratio in (("two_pass", 0.125), ("single_pass", 0.25)):
        r0, r1 = (json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        assert len(r0["records"]) == len(r1["records"]) == 2  # one triage per optimizer step
        for a, b in zip(r0["records"], r1["records"]):
            # the same pooled statistics, thresholds and decisions on both ranks
            assert a["log_ppl"] == b["log_ppl"] and a["entropy"] == b["entropy"]
            assert a["thresholds"] == b["thresholds"] and a["level"] == b["level"]
            assert a["keep"] == b["keep"] and a["quadrant"] == b["quadrant"]
            # the pool is both ranks' samples (4 each), each rank owning its own slice
            assert len(a["keep"]) == 8 and (a["offset"], b["offset"]) == (0, 4)
            assert a["n_local"] == b["n_local"] == 4
            # and the rule is the single-process one applied to the gathered statistics
            ppl = torch.tensor(a["log_ppl"], dtype=torch.float64).exp()
            keep, _ = select_samples(ppl, torch.tensor(a["entropy"], dtype=torch.float64), ratio)
            assert keep.tolist() == a["keep"] and sum(a["keep"]) == 8 * ratio
        # the logged shares are global, and DDP kept the replicas identical (with two-pass at 1 of 8 one rank
        # trains on nothing each step: it still has to join the gradient all-reduce, or this would hang)
        logs0 = [h for h in r0["log_history"] if "loss" in h]
        logs1 = [h for h in r1["log_history"] if "loss" in h]
        assert [h["qtuning/kept_sample_share"] for h in logs0] == [ratio, ratio]
        assert [h["qtuning/kept_token_share"] for h in logs0] == [h["qtuning/kept_token_share"] for h in logs1]
        assert r0["param_checksum"] == pytest.approx(r1["param_checksum"], rel=1e-6)
