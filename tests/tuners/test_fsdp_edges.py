"""FSDP2 edge cases: the order ``fully_shard`` → forward → ``get_peft_model``, saved adapters on a sharded base, the
layout refusals shared by the adapter types and LoRAPrune's pruner, and what the sharded export's summary and the
gathered-root check rely on.

The 2-rank cases run once (``fsdp_edges_worker.py``, 2 CPU processes on gloo); the rest build FSDP2 layouts in a
1-process gloo group.
"""

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import prune_peft
from prune_peft import _dist
from prune_peft.evaluation import sparsity_report
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners import _fsdp
from prune_peft.tuners.loraprune.pruner import SUPPORTED_SHARDING, check_sharding

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from ddp_testlib import one_rank_fixture, two_rank_results  # noqa: F401 (a fixture)

WORKER = Path(__file__).with_name("fsdp_edges_worker.py")
KINDS = ("loraprune", "sparse_lora")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(WORKER, tmp_path_factory.mktemp("fsdp_edges"), timeout=600, name="rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("before", ["eval_forward", "train_step"])
def test_get_peft_model_after_a_forward_equals_the_order_without_it(ranks, kind, before):
    """fully_shard, a forward (no_grad: the root keeps its parameters gathered; or a whole training step), then
    get_peft_model and 4 steps with an optimizer over every trainable parameter: the same run as without the forward.
    Before the fix the no_grad case froze the root's gathered copies: once resharded, the embeddings, norm and head
    were trainable again and received gradients (an optimizer built then would have trained them)."""
    for r in ranks:
        assert r["world_size"] == 2
        ref, got = r[kind]["none"], r[kind][before]
        assert got["root_gathered_before"] is (before == "eval_forward")  # the case is the one named
        assert got["trainable"] == ref["trainable"] and all("lora_" in n for n in got["trainable"])
        assert got["trainable_after"] == got["trainable"] == ref["trainable_after"]  # the shards FSDP2 put back
        assert got["grads_left"] == ref["grads_left"] == []  # only parameters outside the optimizer keep one
        assert got["all_sharded"] and ref["all_sharded"]  # every parameter, adapters included, a DTensor shard
        assert got["weights"].keys() == ref["weights"].keys()
        assert all(torch.equal(got["weights"][n], w) for n, w in ref["weights"].items())  # bit for bit
        if kind == "loraprune":
            assert ref["pruned"] > 0 and got["masks"].keys() == ref["masks"].keys()
            assert all(torch.equal(got["masks"][k], m) for k, m in ref["masks"].items())
    assert all(
        torch.equal(ranks[0][kind][before]["weights"][n], w) for n, w in ranks[1][kind][before]["weights"].items()
    )


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_adapter_on_a_sharded_base_is_refused_whatever_is_trainable(ranks, kind):
    """PeftModel.from_pretrained (is_trainable False or True) and transformers' load_adapter(is_trainable=True): a
    ValueError naming the problem and the supported order, before anything changes (LoRAPrune's is_trainable=True
    path used to load into the shards)."""
    for r in ranks:
        loads = r[kind]["loads"]
        assert loads.keys() == {"from_pretrained", "from_pretrained_trainable", "transformers_load_adapter_trainable"}
        for way, res in loads.items():
            msg = res["error"]
            assert msg.startswith(f"{kind}: the model's parameters are already sharded (fsdp2) and a saved adapter"), (
                way
            )
            assert "then fully_shard(block)" in msg, way
            assert res["unchanged"], way  # module types, parameters, flags; no adapter layer, no peft_config


# ----------------------------------------------------------------------------------------- in one process


def test_fsdp2_still_marks_the_modules_it_manages(one_rank):
    """``_fsdp.gathered_by_outer_unit`` reads torch's private ``_is_fsdp_managed_module`` (no public API says whether
    a module is managed). If torch renames it, the check would answer False everywhere and a merge after an
    evaluation forward would be lost silently; this fails first, naming the attribute."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    fully_shard(model)  # one unit, the root: it keeps its parameters gathered after a forward without backward
    head = model.lm_head
    assert getattr(head, "_is_fsdp_managed_module", None) is True, "torch renamed FSDP2's _is_fsdp_managed_module"
    assert not _fsdp.gathered_by_outer_unit(head)  # sharded
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert _fsdp.gathered_by_outer_unit(head)
    model.reshard()
    assert not _fsdp.gathered_by_outer_unit(head)
    assert not _fsdp.gathered_by_outer_unit(torch.nn.Linear(2, 2))  # not managed: plain parameters are normal


def test_sharded_export_summary_is_sparsity_report_of_the_same_counts(pruned):
    """``_fsdp._summary`` (the sharded export's card and info) and ``sparsity_report`` share one per-type
    aggregation: from the same per-module counts they give the same report, key for key."""
    model = pruned("2:4", num_hidden_layers=2)
    with torch.no_grad():  # different sparsities per module type
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[0].self_attn.q_proj.weight[:4] = 0
    report = sparsity_report(model)
    stats = {n: (e["numel"], e["zeros"], e["2:4_violations"]) for n, e in report["modules"].items()}
    assert _fsdp._summary(stats, report["other"]) == report
    assert report["by_type"]["down_proj"]["modules"] == 2 and report["by_type"]["down_proj"]["sparsity"] > 0.5
    assert list(report["by_type"]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _shard(model, how: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    kw = {}
    if how == "2d":  # HSDP: replicate × shard
        kw["mesh"] = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    elif how == "named":
        kw["mesh"] = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    elif how == "cols":
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.dim() == 2 else Shard(0)
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    for block in inner.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


REFUSED = {  # the wording of each layout refusal (unchanged since the shared check replaced two copies of the loop)
    "2d": "{m}: the model's parameters are already sharded (fsdp2) and model.embed_tokens.weight lives on a 2-D mesh "
    "of 1 ranks (world size 1, e.g. HSDP): adapters are sharded beside a base only on a 1-D mesh over all ranks; ",
    "named": "{m}: the model's parameters are already sharded (fsdp2) and model.embed_tokens.weight lives on a mesh "
    "named ('tp',): peft sizes adapters on a mesh with other dimension names to the local shard (tensor parallel); "
    "shard with an unnamed mesh (fully_shard's default) or one named 'fsdp'; ",
    "cols": "{m}: model.embed_tokens.weight is a tensor sharded as (Shard(dim=1),) (only dim-0 shards, FSDP2's "
    "layout, are supported); ",
}


@pytest.mark.parametrize("how", list(REFUSED))
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_base_layouts_are_refused_before_injection(one_rank, how, kind):
    cfg = {
        "loraprune": lambda: prune_peft.LoRAPruneConfig(r=4, target_sparsity=0.5),
        "sparse_lora": lambda: prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj"]),
    }[kind]
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    _shard(model, how)
    before = {n: (_dist.local(p.detach()).clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        get_peft_model(model, cfg())
    assert str(err.value) == REFUSED[how].format(m=kind) + _fsdp._ORDER
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    after = {n: (_dist.local(p.detach()), p.requires_grad) for n, p in model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(v, before[n][0]) and f == before[n][1] for n, (v, f) in after.items())


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("2d", "loraprune: base_model.model.model.embed_tokens.weight is sharded on a 2-D mesh of 1 ranks (world size "
         "1, e.g. HSDP): the score vectors are reduced over all ranks, so replicas would be counted twice; "),
        ("cols", "loraprune: base_model.model.model.embed_tokens.weight is a tensor sharded as (Shard(dim=1),) (only "
         "dim-0 shards, FSDP2's layout, are supported); "),
        ("named", None),  # mesh names matter only to peft's injection: the pruner scores these shards
    ],
)  # fmt: skip
def test_loraprune_check_sharding_words_the_shared_check(one_rank, how, expected):
    model = get_peft_model(tiny_causal_lm(seed=0, num_hidden_layers=2), prune_peft.LoRAPruneConfig(r=4))
    _shard(model, how)
    if expected is None:
        check_sharding(model)
        return
    with pytest.raises(ValueError) as err:
        check_sharding(model)
    assert str(err.value) == expected + SUPPORTED_SHARDING + "."


def test_unsupported_shard_names_the_first_parameter_and_kind(one_rank):
    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    assert _dist.unsupported_shard(model) is None  # nothing sharded
    _shard(model, "named")
    assert _dist.unsupported_shard(model) is None  # names are checked only when asked
    issue = _dist.unsupported_shard(model, mesh_names=True)
    assert (issue.name, issue.kind, issue.mesh.mesh_dim_names, issue.reason) == (
        "model.embed_tokens.weight", "mesh_names", ("tp",), ""
    )  # fmt: skip
    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    _shard(model, "cols")
    issue = _dist.unsupported_shard(model)
    assert (issue.name, issue.kind) == ("model.embed_tokens.weight", "placement")
    assert issue.reason == "a tensor sharded as (Shard(dim=1),) (only dim-0 shards, FSDP2's layout, are supported)"
    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    _shard(model, "2d")
    issue = _dist.unsupported_shard(model, mesh_names=True)  # the mesh is checked before its names
    assert (issue.name, issue.kind, issue.mesh.ndim) == ("model.embed_tokens.weight", "mesh", 2)
