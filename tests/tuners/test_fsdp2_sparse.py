"""SparseLoRA and SPP on FSDP2 (torch's ``fully_shard``): 2 CPU ranks on gloo against the same loop in one process.

One launch (``fsdp2_sparse_worker.py``) runs every distributed check for both adapter types; the tests below read
what each rank recorded. The refusals that need no second process are tested directly.
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model

import prune_peft
from prune_peft import PruneCallback
from prune_peft.tuners._fsdp import check_sharded_layout

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from ddp_testlib import one_rank_fixture, two_rank_results  # noqa: F401 (a fixture)

WORKER = Path(__file__).with_name("fsdp2_sparse_worker.py")
KINDS = ("sparse_lora", "spp")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_sparse")
    return out, two_rank_results(WORKER, out, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_training_matches_one_process_and_resume_is_exact(ranks, kind):
    _, (r0, r1) = ranks
    assert r0["world_size"] == r1["world_size"] == 2
    a, b = r0[kind], r1[kind]
    assert a["drivers"] == ["sparse-adapter:default"]  # PruneCallback.on_train_begin accepted the FSDP2 model
    assert a["metrics"]["prune/sparse_adapter_sparsity"] == pytest.approx(0.5)
    assert a["adapter_sharded"] and b["adapter_sharded"]  # factors are DTensors: FSDP2 manages them
    assert a["rows"] == [0, 32] and b["rows"] == [32, 64]  # each rank holds half of the rows of q_proj
    # 4 AdamW steps, each rank on half the batch vs one process on all of it: equal up to float rounding
    assert a["adapter_vs_one_process"] < 1e-4 and b["adapter_vs_one_process"] == a["adapter_vs_one_process"]
    # resumed from the sharded torch.distributed.checkpoint at step 2 = the uninterrupted run, bit for bit
    assert a["resume_equal"] == 0.0 and b["resume_equal"] == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_zero_checks_read_local_rows_and_agree_across_ranks(ranks, kind):
    _, (r0, r1) = ranks
    # a zero filled in on rank 1's shard only: the save-time check refuses on both ranks, naming the layer
    for r in (r0, r1):
        msg = r[kind]["corrupt_save"]
        assert "model.layers.0.self_attn.q_proj no longer matches" in msg and "1 non-zero weights" in msg
        # the load-time check on a sharded base refuses a mask that drops non-zeros (every rank, counts summed)
        assert "do not match this base model's zeros" in r[kind]["bad_mask_load"]
        assert "2048 non-zero weights where the adapter's mask is zero" in r[kind]["bad_mask_load"]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_export_equal_the_single_process_merge(ranks, kind):
    out, (r0, r1) = ranks
    for r in (r0, r1):
        res = r[kind]
        # merge_adapter / unmerge_adapter / merge_and_unload on the sharded model vs one process with the same adapter
        assert res["merge_adapter_vs_twin"] == 0.0 and res["unmerge_adapter_vs_twin"] == 0.0
        assert res["merge_vs_twin"] == 0.0 and res["merge_keys_equal"] and res["merge_zeros_kept"]
        assert res["merged_still_sharded"]  # the merge wrote each rank's rows back; nothing was gathered for good
        assert res["merge_vs_one_process"] < 1e-4 and res["merged_logits_vs_one_process"] < 1e-4
        assert res["export_info"]["format"] == "merged" and res["export_info"]["sparsity"] == pytest.approx(0.5)
    assert r0[kind]["export_info"] == r1[kind]["export_info"]  # rank 0's summary on every rank
    # rank 0 wrote one stock checkpoint, reloaded with plain transformers: the single-process merge, bit for bit
    res = r0[kind]
    assert res["export_files"] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert res["export_vs_twin"] == 0.0 and res["export_keys_equal"] and res["export_zeros_kept"]
    assert res["export_vs_one_process"] < 1e-4
    # the adapter saved from the sharded model (adapter tensors gathered, rank 0 writes) reloads unsharded, exactly
    assert res["saved_adapter_vs_sharded"] == 0.0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".export")]  # no temp folder left behind
    if kind == "sparse_lora":
        assert res["export_info"]["2:4_valid_modules"] == res["export_info"]["modules"] == 14


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_issue_order_shard_first_then_get_peft_model_equals_both_other_runs(ranks, kind):
    """fully_shard(block) for every block, fully_shard(model), then get_peft_model: each adapted layer becomes its own
    FSDP2 unit; masks equal the one-process masks, the trained adapter equals the supported order's and one process's."""
    _, (r0, r1) = ranks
    for r in (r0, r1):
        res = r[kind]
        assert res["issue_units"] == [14, 14]  # 2 blocks × 7 adapted linears, each its own FSDP2 unit
        assert res["issue_adapter_sharded"]  # every adapter tensor a DTensor shard: FSDP2 reduces its gradients
        assert res["issue_masks_equal"] and res["issue_masks_equal_after"]  # taken from all rows, kept by training
        assert res["issue_vs_one_process"] < 1e-4  # the tolerance of the supported order's test above
        assert res["issue_vs_supported_order"] == 0.0  # the same floats as the adapter-first order, bit for bit
        assert res["issue_merge_keys_equal"] and res["issue_merge_zeros_kept"]
        assert res["issue_merge_vs_one_process"] < 1e-4
    assert r0[kind]["issue_vs_one_process"] == r1[kind]["issue_vs_one_process"]  # replicated after gathering


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_saved_or_second_adapters_on_a_sharded_base_are_refused(ranks, kind):
    _, (r0, r1) = ranks
    for r in (r0, r1):
        msg = r[kind]["sharded_base_from_pretrained"]
        assert msg.startswith(f"{kind}: the model's parameters are already sharded (fsdp2) and a saved adapter")
        assert "then fully_shard(block)" in msg
        msg = r[kind]["sharded_base_second_adapter"]
        assert "already holds adapter layers" in msg and "then fully_shard(block)" in msg


# ----------------------------------------------------------------------------------- refusals in one process


def _sparse_model(pruned):
    return get_peft_model(pruned("2:4"), prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(
    ("mark", "setup"),
    [("ds_numel", "DeepSpeed ZeRO-3"), ("_is_flat_param", "FSDP1 (FullyShardedDataParallel)")],
)
def test_prune_callback_refuses_fsdp1_and_zero3_before_training(pruned, mark, setup):
    model = _sparse_model(pruned)
    setattr(next(model.parameters()), mark, 123 if mark == "ds_numel" else True)  # what these wrappers leave
    cb = PruneCallback()
    with pytest.raises(
        ValueError, match=re.escape(f"PruneCallback: SparseLoRA/SPP on {setup} is not supported")
    ) as err:
        cb.on_train_begin(None, SimpleNamespace(max_steps=4, global_step=0), None, model=model)
    assert "FSDP2 (torch.distributed.fsdp.fully_shard" in str(err.value) and "DDP" in str(err.value)


def test_unsharded_model_passes_the_layout_check(pruned):
    model = _sparse_model(pruned)
    check_sharded_layout(model, owner="test")  # no sharding: nothing to refuse
    before = {n: p.clone() for n, p in model.named_parameters()}
    cb = PruneCallback()
    cb.on_train_begin(None, SimpleNamespace(max_steps=4, global_step=0), None, model=model)
    assert [d.key for d in cb.drivers] == ["sparse-adapter:default"]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_fsdp2_layouts_the_adapters_cannot_serve_are_refused(pruned, one_rank):
    from torch.distributed.fsdp import fully_shard

    cb = PruneCallback()
    begin = SimpleNamespace(max_steps=4, global_step=0)
    # only block 0 sharded: block 1's adapter factors are plain tensors whose gradients FSDP2 never reduces
    model = _sparse_model(pruned)
    fully_shard(model.base_model.model.model.layers[0])
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) are not") as err:
        cb.on_train_begin(None, begin, None, model=model)
    assert "model.layers.1" in str(err.value)
    # fully_shard on the wrapped nn.Linear: its weight stays sharded where the adapter reads it
    model = _sparse_model(pruned)
    layers = model.base_model.model.model.layers
    fully_shard(layers[0].self_attn.q_proj.base_layer)
    for block in layers:
        fully_shard(block)
    fully_shard(model)
    with pytest.raises(
        ValueError, match=r"fully_shard was applied to the wrapped linear of .*layers\.0\.self_attn\.q_proj"
    ):
        cb.on_train_begin(None, begin, None, model=model)
    # the supported layout passes
    model = _sparse_model(pruned)
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    cb.on_train_begin(None, begin, None, model=model)
    assert [d.key for d in cb.drivers] == ["sparse-adapter:default"]


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_export_writes_what_the_unsharded_export_writes(pruned, one_rank, tmp_path, monkeypatch, kind):
    """Tied embeddings, several files: the module-by-module writer gives the keys and values of save_pretrained."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    from prune_peft.hub import export
    from prune_peft.tuners import _fsdp

    cfg = {"sparse_lora": prune_peft.SparseLoraConfig, "spp": prune_peft.SPPConfig}[kind]
    kw = {"init_lora_weights": False} if kind == "sparse_lora" else {"n_blocks": 4}
    model = get_peft_model(pruned("2:4", tie_word_embeddings=True), cfg(target_modules=["q_proj", "down_proj"], **kw))
    with torch.no_grad():  # SPP starts as the identity (w_col = 0): give it an update to merge
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    plain = export(model, tmp_path / "plain")
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    monkeypatch.setattr(_fsdp, "MAX_SHARD_BYTES", 100_000)
    sharded = export(model, tmp_path / "sharded")

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(tmp_path / "plain"), tensors(tmp_path / "sharded")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b  # tied: saved once, as save_pretrained does
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(b) and len(set(index["weight_map"].values())) > 1
    assert sharded["sparsity"] == plain["sparsity"] and sharded["2:4_valid_modules"] == plain["2:4_valid_modules"]
    card = (tmp_path / "sharded" / "README.md").read_text()
    assert "tied to model.embed_tokens" in card and "sparsity of the pruned modules" in card
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_merge_after_an_evaluation_forward_on_a_single_unit(pruned, one_rank, tmp_path, kind):
    """The FSDP2 root keeps its parameters gathered after a forward without backward. With one unit (the root holds
    every parameter) a merge would be written into the gathered copy and silently dropped at the next reshard: the
    tuner cannot reach the root, so merge_adapter / merge_and_unload / unmerge_adapter refuse before any change.
    export reshards by itself; after ``model.reshard()`` (the recipe the error names) the merge lands in the shards."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    from prune_peft.hub import export

    def make():
        torch.manual_seed(0)
        if kind == "sparse_lora":
            cfg = prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        else:
            cfg = prune_peft.SPPConfig(target_modules=["q_proj", "down_proj"], n_blocks=4, init_lora_weights=False)
        return get_peft_model(pruned("2:4"), cfg)

    def evaluate():
        with torch.no_grad():
            model(input_ids=ids)
        assert type(q_proj.base_layer.weight).__name__ == "Parameter"  # gathered by the root, not a DTensor

    def shards():
        return {n: p.to_local().clone() for n, p in model.named_parameters()}

    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    want = {k: v.clone() for k, v in make().merge_and_unload().state_dict().items()}
    model = fully_shard(make())  # one unit: the root holds every parameter
    model.eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    evaluate()
    export(model, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(saved[k], want[k]) for k in want)

    # the previously silent case: forward, then merge without model.reshard()
    model.reshard()
    before = shards()
    evaluate()
    for tuner_level, call in ((True, model.merge_and_unload), (True, model.merge_adapter), (False, q_proj.merge)):
        with pytest.raises(ValueError, match=r"Call model\.reshard\(\) on the FSDP2 root before") as err:
            call()
        assert "gathered" in str(err.value)
        if tuner_level:  # the tuner names every adapted layer it refuses
            assert "model.layers.0.self_attn.q_proj, model.layers.0.mlp.down_proj" in str(err.value)
    assert not q_proj.merged and not q_proj.merged_adapters
    model.reshard()
    assert all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())  # nothing changed

    # the recipe: reshard the root, then merge_and_unload merges into the shards
    evaluate()
    model.reshard()
    merged = model.merge_and_unload()
    got = {k: v.full_tensor() for k, v in merged.state_dict().items()}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    # unmerge_adapter is refused the same way (a second model: SPP's unmerge divides, so it is not bitwise)
    model = fully_shard(make())
    model.eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    model.merge_adapter()
    assert q_proj.merged
    merged_shards = shards()
    evaluate()
    with pytest.raises(ValueError, match=r"unmerge: .*Call model\.reshard\(\) on the FSDP2 root"):
        model.unmerge_adapter()
    assert q_proj.merged
    model.reshard()
    assert all(torch.equal(p.to_local(), merged_shards[n]) for n, p in model.named_parameters())
    model.unmerge_adapter()
    assert not q_proj.merged
