"""LoRAPrune under FSDP2 (torch's fully_shard) on 2 CPU ranks equals the same plain loop in one process.

The worker (fsdp2_worker.py) shards every decoder block and the root after get_peft_model (and once more in the
issue's order, fully_shard first, then get_peft_model), trains with
``loss.backward(); update_and_allocate(step); opt.step()`` and prunes at every step. The base weights stay row shards
throughout: each rank scores its rows, gathers only A and ∂L/∂A, and one all-reduce per step sums the score vectors.
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "callbacks"))
from ddp_testlib import load_worker, two_rank_results  # noqa: E402

worker = load_worker(HERE / "fsdp2_worker.py", "loraprune_fsdp2_worker")

# gradients are averaged by FSDP2's reduce-scatter and column scores summed over ranks, so the importance and the
# adapter weights equal the single-process values to float32 rounding of those reductions; the masks exactly
IMPORTANCE_RTOL = 1e-5
ADAPTER_ATOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(
        HERE / "fsdp2_worker.py", tmp_path_factory.mktemp("fsdp2"), timeout=240, name="rank{rank}.pt"
    )


@pytest.fixture(scope="module")
def single():
    model = worker.loraprune_model(**worker.CFG)
    model.base_model.prepare_pruning(total_steps=worker.STEPS)
    return worker.loop(model, worker.optimizer(model), worker.batches(), range(worker.STEPS))


@pytest.mark.distributed
def test_fsdp2_masks_and_importance_equal_the_single_process_run(ranks, single):
    assert all(r["world_size"] == 2 for r in ranks)
    pruned = []
    for step, (a, b, ref) in enumerate(zip(ranks[0]["records"], ranks[1]["records"], single)):
        assert a["masks"].keys() == ref["masks"].keys() == {"1.units", "1.channels", "2.units", "2.channels"}
        for key, mask in ref["masks"].items():
            assert torch.equal(a["masks"][key], mask) and torch.equal(b["masks"][key], mask), (step, key)
        assert a["importance"].keys() == ref["importance"].keys() == {"u1", "c1", "u2", "c2"}
        for key, value in ref["importance"].items():
            assert torch.equal(a["importance"][key], b["importance"][key]), (step, key)  # replicated bitwise
            torch.testing.assert_close(a["importance"][key], value, rtol=IMPORTANCE_RTOL, atol=0)
        assert (a["last_step"], a["level"]) == (b["last_step"], b["level"]) == (ref["last_step"], ref["level"])
        pruned.append(sum(int((~m).sum()) for m in ref["masks"].values()))
    assert pruned[0] > 0 and pruned[-1] > pruned[0]  # pruning happened, and progressed, inside the compared run
    for key, value in single[-1]["adapter"].items():
        for r in ranks:
            torch.testing.assert_close(r["records"][-1]["adapter"][key], value, rtol=0, atol=ADAPTER_ATOL)


@pytest.mark.distributed
def test_fsdp2_issue_order_shard_first_then_get_peft_model_equals_both_other_runs(ranks, single):
    """fully_shard(block) for every block, fully_shard(model), then get_peft_model: each adapted layer becomes its own
    FSDP2 unit on the base's mesh; the same loop gives the masks of the supported order and of one process."""
    for r in ranks:
        lay = r["issue_layout"]
        assert lay["adapter_dtensors"] and lay["b_rows_match"]  # every LoRA tensor a shard; B's rows are W's rows
        assert lay["layers"] == lay["layer_units"] == 21  # 3 blocks × 7 adapted linears, each its own unit
    q0, q1 = ranks[0]["issue_layout"]["q_rows"], ranks[1]["issue_layout"]["q_rows"]
    assert q0[0] == 0 and q0[1] == q1[0] < q1[1]  # rank 0 the first half of q_proj's rows, rank 1 the rest
    for step, ref in enumerate(single):
        a, b = ranks[0]["issue_order"][step], ranks[1]["issue_order"][step]
        supported = ranks[0]["records"][step]
        for key, mask in ref["masks"].items():
            assert torch.equal(a["masks"][key], mask) and torch.equal(b["masks"][key], mask), (step, key)
            assert torch.equal(supported["masks"][key], mask), (step, key)
        for key, value in ref["importance"].items():
            assert torch.equal(a["importance"][key], b["importance"][key]), (step, key)
            torch.testing.assert_close(a["importance"][key], value, rtol=IMPORTANCE_RTOL, atol=0)
            # each order is within the tolerance of one process, so within twice it of the other (measured 1.1e-5:
            # the adapter's own unit gathers into other buffers than the block's, and CPU GEMMs round by alignment)
            torch.testing.assert_close(
                a["importance"][key], supported["importance"][key], rtol=2 * IMPORTANCE_RTOL, atol=0
            )
        assert (a["last_step"], a["level"]) == (ref["last_step"], ref["level"])
    for key, value in single[-1]["adapter"].items():
        for r in ranks:
            torch.testing.assert_close(r["issue_order"][-1]["adapter"][key], value, rtol=0, atol=ADAPTER_ATOL)
            torch.testing.assert_close(
                r["issue_order"][-1]["adapter"][key], r["records"][-1]["adapter"][key], rtol=0, atol=2 * ADAPTER_ATOL
            )


@pytest.mark.distributed
def test_fsdp2_resume_from_full_state_dicts_equals_the_uninterrupted_run(ranks):
    for r in ranks:
        assert len(r["resumed"]) == worker.STEPS - worker.RESUME_AT
        for got, want in zip(r["resumed"], r["records"][worker.RESUME_AT :]):
            for part in ("masks", "importance", "adapter"):
                assert got[part].keys() == want[part].keys()
                assert all(torch.equal(got[part][k], want[part][k]) for k in want[part]), part
    own = [r["own_state_at_resume"] for r in ranks]  # each rank's pruner state_dict: full and replicated
    assert own[0]["importance"].keys() == own[1]["importance"].keys() and own[0]["importance"]
    assert all(torch.equal(own[0]["importance"][k], own[1]["importance"][k]) for k in own[0]["importance"])
    assert (own[0]["last_step"], own[0]["level"]) == (own[1]["last_step"], own[1]["level"])
    assert own[0]["last_step"] == worker.RESUME_AT and own[0]["level"] > 0


@pytest.mark.distributed
def test_fsdp2_unservable_setups_are_refused_with_the_supported_one(ranks):
    for r in ranks:
        assert r["full_many_equals_full_tensor"] is True  # the one-collective gather of A and dL/dA, uneven shards
        msgs = r["refusals"]
        # on a sharded base: element masks are refused at get_peft_model, a second adapter before it is injected
        assert "element-wise masks" in msgs["shard_then_peft_unstructured"]
        assert "already holds adapter layers" in msgs["second_adapter"] and "get_peft_model" in msgs["second_adapter"]
        assert r["refusals"]["second_adapter_rolled_back"] is True
        assert "element-wise masks" in msgs["unstructured"] and "supported:" in msgs["unstructured"]
        assert "importance='grad'" in msgs["grad"] and "supported:" in msgs["grad"]


def test_zero3_and_fsdp1_parameters_are_refused_before_any_work():
    model = worker.loraprune_model(**worker.CFG)
    param = next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n)
    param.ds_numel = param.numel()  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(ValueError, match=r"ZeRO-3.*supported: DDP"):
        model.base_model.prepare_pruning(total_steps=worker.STEPS)
    del param.ds_numel
    param._is_flat_param = True  # FSDP1's FlatParameter marker
    with pytest.raises(ValueError, match=r"FSDP1.*supported: DDP"):
        model.base_model.prepare_pruning(total_steps=worker.STEPS)
    del param._is_flat_param
    model.base_model.prepare_pruning(total_steps=worker.STEPS)  # unsharded: accepted


@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate applies FSDP only on GPU backends")
def test_trainer_with_accelerate_fsdp2_equals_the_unsharded_trainer_on_gpu(tmp_path):
    """Trainer + accelerate FSDP2 (one rank, CUDA) + PruneCallback: the same masks as the same Trainer unsharded.

    On CPU accelerate ignores the FSDP plugin (AcceleratorState picks DistributedType.FSDP only for GPU-type
    backends; MULTI_CPU trains with DDP), so this path needs a GPU; the plain-loop tests above cover CPU."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = HERE / "fsdp2_trainer_worker.py"
    for mode in ("fsdp", "plain"):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                    "--master_port=29581"] if mode == "fsdp" else []  # fmt: skip
        proc = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path), mode], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = torch.load(tmp_path / "trainer_fsdp.pt", weights_only=False)
    plain = torch.load(tmp_path / "trainer_plain.pt", weights_only=False)
    assert sharded["sharded"] is True and plain["sharded"] is False
    assert sharded["masks"].keys() == plain["masks"].keys() and sharded["masks"]
    assert all(torch.equal(sharded["masks"][k], plain["masks"][k]) for k in plain["masks"])
    for key, value in plain["state"]["importance"].items():
        torch.testing.assert_close(sharded["state"]["importance"][key], value, rtol=1e-4, atol=0)
