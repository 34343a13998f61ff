"""LoRAPrune under DDP: 2 processes on gloo hold identical masks at every optimizer step."""

import json
from pathlib import Path

import pytest
from ddp_testlib import run_two_ranks

WORKER = Path(__file__).with_name("prune_ddp_worker.py")


@pytest.mark.distributed
def test_two_ranks_hold_identical_masks_at_every_step(tmp_path):
    run_two_ranks(WORKER, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert [r["step"] for r in r0["records"]] == [1, 2, 3, 4] == [r["step"] for r in r1["records"]]
    for a, b in zip(r0["records"], r1["records"]):
        assert a["masks"] == b["masks"]
        # gradients are all-reduced before on_pre_optimizer_step: the importance itself agrees across ranks
        assert a["importance"].keys() == b["importance"].keys()
        for key in a["importance"]:
            assert a["importance"][key] == pytest.approx(b["importance"][key], rel=1e-6)
    # pruning happened during the run (masks changed between steps) and ended at the target
    first, last = r0["records"][0]["masks"]["1"], r0["records"][-1]["masks"]["1"]
    assert sum(first["channels"]) > sum(last["channels"]) == 64
    assert sum(last["units"]) == 1
