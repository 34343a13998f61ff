"""Worker for test_fsdp2.py: run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Each rank trains a tiny LoRAPrune Llama sharded with torch's ``fully_shard`` (FSDP2; every decoder block, then the
root, after ``get_peft_model``; and again in the issue's order, ``fully_shard`` first) in a plain loop — ``loss.backward(); update_and_allocate(step); opt.step()`` — on its
half of every global batch, pruning at every step. It writes ``<out>/rank<r>.pt``: masks and importance after every
step, the whole adapter weights at the end, the same after a resume from a full state dict taken mid-run, and the
messages of the setups that must be refused. ``loop`` and ``snapshot`` are shared with the single-process reference.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "callbacks"))

import torch
from prune_testlib import collate, loraprune_model, token_rows

from prune_peft import _dist

STEPS, PER_RANK, WORLD, RESUME_AT = 6, 2, 2, 3
CFG = dict(target_sparsity=0.5, prune_every=1, warmup=0.0)


def batches(rank: int = 0, world: int = 1) -> list[dict]:
    """Step t's global batch is rows [t·4, (t+1)·4) of one fixed set; rank r of ``world`` takes its share."""
    rows = token_rows(STEPS * PER_RANK * WORLD, seed=3)
    per = PER_RANK * WORLD // world
    out = []
    for t in range(STEPS):
        step_rows = rows[t * PER_RANK * WORLD : (t + 1) * PER_RANK * WORLD]
        out.append(collate(step_rows[rank * per : (rank + 1) * per]))
    return out


def optimizer(model):
    return torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-3)


def snapshot(model) -> dict:
    """Masks, the pruner's (full, replicated) state and the whole adapter weights, on CPU."""
    masks = {f"{i}.{k}": v.clone() for i, m in model.base_model.get_masks().items() for k, v in m.items()}
    state = model.base_model.pruner().state_dict()
    adapter = {n: _dist.full(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"masks": masks, "importance": state["importance"], "last_step": state["last_step"],
            "level": state["level"], "adapter": adapter}  # fmt: skip


def loop(model, opt, data, steps: range) -> list[dict]:
    """The plain loop of the issue; a snapshot after every step."""
    records = []
    model.train()
    for step in steps:
        model(**data[step]).loss.backward()
        model.base_model.update_and_allocate(step)  # scores the gradients present now; prunes on the schedule
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append(snapshot(model))
    return records


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)


def sharded_model():
    model = loraprune_model(**CFG)
    shard(model)
    model.base_model.prepare_pruning(total_steps=STEPS)
    return model


def sharded_base():
    from torch.distributed.fsdp import fully_shard

    from prune_peft.testing import tiny_causal_lm

    base = tiny_causal_lm(seed=0, num_hidden_layers=3)  # loraprune_model's base
    for block in base.model.layers:
        fully_shard(block)
    fully_shard(base)
    return base


def issue_order_model():
    """The issue's order: fully_shard every block and the base model, then get_peft_model (loraprune_model's seeds,
    B filled with the same values, distributed as the shards FSDP2 made)."""
    from peft import get_peft_model
    from torch.distributed.tensor import distribute_tensor

    from prune_peft import LoRAPruneConfig

    base = sharded_base()
    torch.manual_seed(100)  # loraprune_model: LoRA A init
    model = get_peft_model(base, LoRAPruneConfig(r=4, exclude_layers=[0], **CFG))
    with torch.no_grad():
        g = torch.Generator().manual_seed(200)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(distribute_tensor(torch.randn(p.shape, generator=g) * 0.05, p.device_mesh, p.placements))
    model.base_model.prepare_pruning(total_steps=STEPS)
    return model


def layout(model) -> dict:
    """How the issue's order sharded the adapters: every LoRA parameter a DTensor, each adapted layer an FSDP2 unit,
    lora_B's rows those of the base weight on this rank."""
    from torch.distributed.fsdp import FSDPModule

    from prune_peft.tuners.loraprune import LoRAPruneLayer

    layers = [m for m in model.modules() if isinstance(m, LoRAPruneLayer)]
    return {
        "adapter_dtensors": all(_dist.is_sharded(p) for n, p in model.named_parameters() if "lora_" in n),
        "layers": len(layers),
        "layer_units": sum(isinstance(m, FSDPModule) for m in layers),
        "b_rows_match": all(
            _dist.local_rows(m.lora_B["default"].weight) == _dist.local_rows(m.get_base_layer().weight) for m in layers
        ),
        "q_rows": list(
            _dist.local_rows(model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight)
        ),
    }


def refusals() -> dict[str, str]:
    """Setups LoRAPrune cannot serve under FSDP2: each must raise ValueError before any work."""
    from peft import get_peft_model

    from prune_peft import LoRAPruneConfig

    out = {}
    try:
        get_peft_model(sharded_base(), LoRAPruneConfig(r=4, target_sparsity=0.5, structure="unstructured"))
        out["shard_then_peft_unstructured"] = "no error"
    except ValueError as exc:
        out["shard_then_peft_unstructured"] = str(exc)
    model = get_peft_model(sharded_base(), LoRAPruneConfig(r=4, target_sparsity=0.5, exclude_layers=[0]))
    try:
        model.add_adapter("second", LoRAPruneConfig(r=4, target_sparsity=0.5, exclude_layers=[0]))
        out["second_adapter"] = "no error"
    except ValueError as exc:
        out["second_adapter"] = str(exc)
    out["second_adapter_rolled_back"] = list(model.peft_config) == ["default"] and not any(
        "second" in n for n, _ in model.named_parameters()
    )
    for name, cfg in (("unstructured", dict(structure="unstructured")), ("grad", dict(importance="grad"))):
        model = loraprune_model(**{**CFG, **cfg})
        shard(model)
        try:
            model.base_model.prepare_pruning(total_steps=STEPS)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


def gather_check() -> bool:
    """_dist.full_many (one all-gather) equals DTensor.full_tensor on uneven shards, an empty shard included."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(5, 3, generator=g), torch.randn(1, 4, generator=g), torch.randn(2, 2, generator=g)]
    shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in whole]
    got = _dist.full_many(shards)
    return all(torch.equal(a, b) and torch.equal(a, s.full_tensor()) for a, b, s in zip(got, whole, shards))


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == WORLD
    data = batches(rank, world)
    result: dict = {"world_size": world}

    model = sharded_model()
    assert _dist.is_sharded(model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight)
    result["records"] = loop(model, optimizer(model), data, range(STEPS))

    # resume: a fresh sharded model and optimizer restored from full state dicts taken after RESUME_AT steps
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    first = sharded_model()
    opt = optimizer(first)
    loop(first, opt, data, range(RESUME_AT))
    options = StateDictOptions(full_state_dict=True)
    model_sd, optim_sd = get_state_dict(first, opt, options=options)
    result["own_state_at_resume"] = first.base_model.pruner().state_dict()  # equal on every rank (replicated)
    pruner_state = [result["own_state_at_resume"]]
    torch.distributed.broadcast_object_list(pruner_state, src=0)  # the state rank 0 would have written
    del first, opt
    second = sharded_model()
    opt = optimizer(second)
    set_state_dict(second, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    second.base_model.pruner().load_state_dict(pruner_state[0])
    result["resumed"] = loop(second, opt, data, range(RESUME_AT, STEPS))

    # the issue's order: fully_shard the base first, then get_peft_model; the same plain loop
    issue = issue_order_model()
    result["issue_layout"] = layout(issue)
    result["issue_order"] = loop(issue, optimizer(issue), data, range(STEPS))
    del issue

    result["refusals"] = refusals()
    result["full_many_equals_full_tensor"] = gather_check()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
