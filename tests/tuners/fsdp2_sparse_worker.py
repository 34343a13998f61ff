"""Worker for test_fsdp2_sparse.py: run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

For SparseLoRA (exact gradients, 2:4 base) and SPP (unstructured base), on a tiny Llama:

* one process: the same plain loop (AdamW, full batch) on an unsharded copy, then its merge — the reference;
* FSDP2: ``get_peft_model``, ``fully_shard`` per decoder block and on the model, each rank on its half of the batch,
  ``PruneCallback`` driving the sparse-adapter driver (``on_train_begin``, the zero check at ``on_save``), a sharded
  checkpoint (torch.distributed.checkpoint) half-way, then: a corrupted zero on one rank's shard (both ranks must
  refuse the save), resume from the checkpoint (must equal the uninterrupted run), a corrupted mask in a loaded state
  dict (refused), ``hub.export`` (rank 0 writes; reloaded with stock transformers), ``merge_and_unload`` (the model
  stays sharded);
* the issue's order: ``fully_shard`` on the pruned base first, then ``get_peft_model`` (each adapted layer becomes its
  own FSDP2 unit), the same loop and ``merge_and_unload``; a saved adapter loaded onto a sharded base and a second
  adapter on it (refused).

Each rank writes what it measured into <out>/rank<r>.json.
"""

import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from adapter_testlib import prune_linears
from peft import PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

import prune_peft
from prune_peft import PruneCallback
from prune_peft._dist import full, local, local_rows
from prune_peft.hub import export
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners import sparse_layers

STEPS, SAVE_AT = 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(kind: str):
    return prune_linears(
        tiny_causal_lm(num_hidden_layers=2, seed=0), "2:4" if kind == "sparse_lora" else "unstructured"
    )


def config(kind: str):
    if kind == "sparse_lora":
        return prune_peft.SparseLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, grad_mode="exact")
    return prune_peft.SPPConfig(r=8, lora_alpha=16, n_blocks=4, target_modules=TARGETS)


def build(kind: str):
    torch.manual_seed(1)
    return get_peft_model(base_model(kind), config(kind))


def shard(model):
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 260, (4, 12), generator=g) for _ in range(STEPS)]


def train(model, opt, data, rows, start: int, stop: int, on_step=None) -> None:
    model.train()
    for step in range(start, stop):
        ids = data[step][rows]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def state(step: int):
    return SimpleNamespace(max_steps=STEPS, global_step=step)


def run(kind: str, out: str, rank: int) -> dict:
    res: dict = {}
    data = batches()
    rows = slice(2 * rank, 2 * rank + 2)
    every = slice(None)

    # -------------------------------------------------------------------------------------- one process (reference)
    ref = build(kind)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    train(ref, opt, data, every, 0, STEPS)
    ref.eval()
    ref_adapter = adapter_weights(ref)
    adapter_dir = os.path.join(out, f"adapter_{kind}")
    if rank == 0:
        ref.save_pretrained(adapter_dir)
    base_zeros = {
        n.removeprefix("base_model.model."): (layer.get_base_layer().weight == 0).clone()
        for n, layer in sparse_layers(ref).items()
    }
    ref_masks = {n: layer.sparse_mask("default").clone() for n, layer in sparse_layers(ref).items()}
    merged_ref = ref.merge_and_unload()
    with torch.no_grad():
        merged_ref_logits = merged_ref(input_ids=data[0]).logits
    merged_ref_sd = {k: v.clone() for k, v in merged_ref.state_dict().items()}

    # ------------------------------------------------------------------------------------------------- FSDP2 run
    sh = shard(build(kind))
    cb = PruneCallback()
    cb.on_train_begin(None, state(0), None, model=sh)
    res["drivers"] = [d.key for d in cb.drivers]
    res["metrics"] = cb.log_metrics()
    opt = torch.optim.AdamW([p for p in sh.parameters() if p.requires_grad], lr=1e-2)
    ckpt = os.path.join(out, f"ckpt_{kind}")

    def on_step(step: int) -> None:
        cb.on_save(None, state(step), None, model=sh)  # the save-time zero check on DTensors
        if step == SAVE_AT:
            msd, osd = get_state_dict(sh, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)

    train(sh, opt, data, rows, 0, STEPS, on_step)
    res["adapter_vs_one_process"] = max_diff(adapter_weights(sh), ref_adapter)
    res["adapter_sharded"] = all(type(p).__name__ == "DTensor" for n, p in sh.named_parameters() if "lora_" in n)

    # a zero of the base filled in on rank 1's shard only: both ranks refuse the save
    layer = next(iter(sparse_layers(sh).values()))
    weight = local(layer.get_base_layer().weight)
    first, end = local_rows(layer.get_base_layer().weight)
    res["rows"] = [first, end]
    pos = (weight == 0).nonzero()[0].tolist()
    if rank == 1:
        weight[pos[0], pos[1]] = 1.0
    try:
        cb.on_save(None, state(STEPS), None, model=sh)
        res["corrupt_save"] = "passed"
    except RuntimeError as exc:
        res["corrupt_save"] = str(exc)
    if rank == 1:
        weight[pos[0], pos[1]] = 0.0
    cb.on_save(None, state(STEPS), None, model=sh)  # restored: passes again

    # ------------------------------------------------------------------------- resume from the sharded checkpoint
    re = shard(build(kind))
    opt2 = torch.optim.AdamW([p for p in re.parameters() if p.requires_grad], lr=1e-2)
    msd, osd = get_state_dict(re, opt2)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(re, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(re, opt2, data, rows, SAVE_AT, STEPS)
    res["resume_equal"] = max_diff(adapter_weights(re), adapter_weights(sh))

    # a loaded mask that drops a non-zero of the base is refused on every rank (the load-time check on DTensors)
    bad = get_model_state_dict(re)
    key = next(k for k in bad if "lora_sparse_mask" in k)
    bad[key] = torch.zeros_like(bad[key])
    try:
        re.load_state_dict(bad)
        res["bad_mask_load"] = "loaded"
    except ValueError as exc:
        res["bad_mask_load"] = str(exc)

    # ------------------------------------------------------------------------------------- export and merge
    # the single-process twin holds the adapter the sharded run trained: merges must equal its merges bit for bit
    twin = build(kind)
    trained = adapter_weights(sh)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.copy_(trained[n])

    # a shareable adapter from the sharded model: gather the adapter tensors only (small), rank 0 writes
    adapter_sd = {k: full(v) for k, v in sh.state_dict().items() if "lora_" in k}
    saved_dir = os.path.join(out, f"saved_{kind}")
    if rank == 0:
        sh.save_pretrained(saved_dir, state_dict=adapter_sd)
    dist.barrier()
    if rank == 0:
        loaded = PeftModel.from_pretrained(base_model(kind), saved_dir)
        res["saved_adapter_vs_sharded"] = max_diff(adapter_weights(loaded), trained)

    def bases(model) -> dict[str, torch.Tensor]:
        return {n: full(layer.get_base_layer().weight).clone() for n, layer in sparse_layers(model).items()}

    sh.merge_adapter()
    twin.merge_adapter()
    res["merge_adapter_vs_twin"] = max_diff(bases(sh), bases(twin))
    sh.unmerge_adapter()
    twin.unmerge_adapter()
    res["unmerge_adapter_vs_twin"] = max_diff(bases(sh), bases(twin))
    twin_sd = {k: v.clone() for k, v in twin.merge_and_unload().state_dict().items()}

    export_dir = os.path.join(out, f"export_{kind}")
    info = export(sh, export_dir)
    res["export_info"] = {k: v for k, v in info.items() if k != "by_type"}
    dist.barrier()
    if rank == 0:
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(export_dir)
        sd_stock = stock.state_dict()
        res["export_keys_equal"] = sorted(sd_stock) == sorted(merged_ref_sd)
        res["export_vs_twin"] = max_diff(sd_stock, twin_sd)
        res["export_vs_one_process"] = max_diff(sd_stock, merged_ref_sd)
        res["export_zeros_kept"] = all(bool((sd_stock[f"{n}.weight"][z] == 0).all()) for n, z in base_zeros.items())
        res["export_files"] = sorted(os.listdir(export_dir))

    merged = sh.merge_and_unload()
    res["merged_still_sharded"] = any(type(p).__name__ == "DTensor" for p in merged.parameters())
    merged_sd = {k: full(v).clone() for k, v in merged.state_dict().items()}
    res["merge_keys_equal"] = sorted(merged_sd) == sorted(merged_ref_sd)
    res["merge_vs_twin"] = max_diff(merged_sd, twin_sd)
    res["merge_vs_one_process"] = max_diff(merged_sd, merged_ref_sd)
    res["merge_zeros_kept"] = all(bool((merged_sd[f"{n}.weight"][z] == 0).all()) for n, z in base_zeros.items())
    sh.eval()  # forward through the FSDP2 root (the sharded PeftModel), which gathers the embeddings and lm_head
    with torch.no_grad():
        res["merged_logits_vs_one_process"] = float((sh(input_ids=data[0]).logits - merged_ref_logits).abs().max())

    # ------------------------------------------------- the issue's order: fully_shard the base, then get_peft_model
    def sharded_base():
        m = base_model(kind)
        for block in m.model.layers:
            fully_shard(block)
        fully_shard(m)
        return m

    torch.manual_seed(1)  # build()'s seed, drawn before the base as there (fully_shard draws no random numbers)
    issue = get_peft_model(sharded_base(), config(kind))
    layers = sparse_layers(issue)
    res["issue_units"] = [sum(isinstance(m, FSDPModule) for m in layers.values()), len(layers)]
    res["issue_adapter_sharded"] = all(_dtensor(p) for n, p in issue.named_parameters() if "lora_" in n)
    res["issue_masks_equal"] = all(torch.equal(layers[n].sparse_mask("default"), m) for n, m in ref_masks.items())
    cb_issue = PruneCallback()
    cb_issue.on_train_begin(None, state(0), None, model=issue)  # check_sharded_layout accepts it
    opt_issue = torch.optim.AdamW([p for p in issue.parameters() if p.requires_grad], lr=1e-2)
    train(issue, opt_issue, data, rows, 0, STEPS, lambda step: cb_issue.on_save(None, state(step), None, model=issue))
    res["issue_masks_equal_after"] = all(
        torch.equal(layers[n].sparse_mask("default"), m) for n, m in ref_masks.items()
    )
    res["issue_vs_one_process"] = max_diff(adapter_weights(issue), ref_adapter)
    res["issue_vs_supported_order"] = max_diff(adapter_weights(issue), trained)
    issue_merged = issue.merge_and_unload()
    issue_sd = {k: full(v).clone() for k, v in issue_merged.state_dict().items()}
    res["issue_merge_keys_equal"] = sorted(issue_sd) == sorted(merged_ref_sd)
    res["issue_merge_vs_one_process"] = max_diff(issue_sd, merged_ref_sd)
    res["issue_merge_zeros_kept"] = all(bool((issue_sd[f"{n}.weight"][z] == 0).all()) for n, z in base_zeros.items())

    # ------------------------------------------------------------------------------ still refused on a sharded base
    try:
        PeftModel.from_pretrained(sharded_base(), adapter_dir)
        res["sharded_base_from_pretrained"] = "accepted"
    except ValueError as exc:
        res["sharded_base_from_pretrained"] = str(exc)
    m = get_peft_model(sharded_base(), config(kind))
    try:
        m.add_adapter("second", config(kind))
        res["sharded_base_second_adapter"] = "accepted"
    except ValueError as exc:
        res["sharded_base_second_adapter"] = str(exc)
    return res


def _dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    result = {"world_size": dist.get_world_size()}
    for kind in ("sparse_lora", "spp"):
        result[kind] = run(kind, out, rank)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
