"""Worker for test_fsdp_edges.py: run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Two edge cases of FSDP2's second order (``fully_shard`` first, then the adapter), for LoRAPrune and SparseLoRA on a
tiny Llama:

* ``get_peft_model`` after the sharded model already ran a forward (under ``no_grad``, where the FSDP2 root keeps its
  parameters gathered, or a whole forward/backward step), then the same plain loop, against the same run with no
  forward before ``get_peft_model``;
* a saved adapter loaded onto a sharded base (``PeftModel.from_pretrained`` with ``is_trainable`` False and True,
  transformers' ``model.load_adapter``): refused, with the base left as it was.

Each rank writes what it measured into <out>/rank<r>.pt.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from adapter_testlib import prune_linears
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

import prune_peft
from prune_peft import _dist
from prune_peft.testing import tiny_causal_lm

STEPS, ROWS = 4, 2  # optimizer steps; sequences per rank and step
KINDS = ("loraprune", "sparse_lora")
BEFORE = ("none", "eval_forward", "train_step")  # what the sharded model ran before get_peft_model


def base(kind: str):
    if kind == "loraprune":
        return tiny_causal_lm(seed=0, num_hidden_layers=3)
    return prune_linears(tiny_causal_lm(seed=0, num_hidden_layers=2), "2:4")


def config(kind: str):
    if kind == "loraprune":
        return prune_peft.LoRAPruneConfig(r=4, target_sparsity=0.5, prune_every=1, warmup=0.0, exclude_layers=[0])
    return prune_peft.SparseLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def sharded_base(kind: str):
    model = base(kind)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    every = [torch.randint(3, 260, (2 * ROWS, 12), generator=g) for _ in range(STEPS + 1)]
    return [ids[rank * ROWS : (rank + 1) * ROWS] for ids in every]


def run_forward(model, ids: torch.Tensor, before: str) -> None:
    if before == "eval_forward":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    elif before == "train_step":
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)


def train(kind: str, before: str, data: list[torch.Tensor]) -> dict:
    """fully_shard, ``before``, get_peft_model, then a plain loop with an optimizer over every trainable parameter
    (what a user writes): the trainable names, the root's state before get_peft_model, and the trained weights."""
    model = sharded_base(kind)
    run_forward(model, data[-1], before)
    embed = model.model.embed_tokens.weight
    out = {"root_gathered_before": not _dist.is_sharded(embed)}
    torch.manual_seed(1)
    model = get_peft_model(model, config(kind))
    if kind == "loraprune":  # non-zero B (seeded, whole value split as the shard): informative LoRA gradients
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(distribute_tensor(torch.randn(p.shape, generator=g) * 0.05, p.device_mesh, p.placements))
        model.base_model.prepare_pruning(total_steps=STEPS)
    out["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out["all_sharded"] = all(_dist.is_sharded(p) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(STEPS):
        ids = data[step]
        model(input_ids=ids, labels=ids).loss.backward()
        if kind == "loraprune":
            model.base_model.update_and_allocate(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # after training (every unit resharded): the flags and gradients of the parameters FSDP2 actually keeps
    out["trainable_after"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out["grads_left"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    if kind == "loraprune":
        out["masks"] = {f"{i}.{k}": v.clone() for i, m in model.base_model.get_masks().items() for k, v in m.items()}
        out["pruned"] = sum(int((~m).sum()) for m in out["masks"].values())
    out["weights"] = {n: _dist.full(p.detach()).clone() for n, p in model.named_parameters()}
    return out


def snapshot(model) -> dict:
    """What a refused load must leave as it was: module types, parameter names, local values and flags."""
    return {
        "types": [type(m).__name__ for m in model.modules()],
        "params": {n: (_dist.local(p.detach()).clone(), p.requires_grad) for n, p in model.named_parameters()},
        "tuner_layers": sum(isinstance(m, BaseTunerLayer) for m in model.modules()),
        "peft_config": hasattr(model, "peft_config"),
    }


def unchanged(a: dict, b: dict) -> bool:
    return (
        a["types"] == b["types"]
        and a["params"].keys() == b["params"].keys()
        and all(torch.equal(v, b["params"][n][0]) and f == b["params"][n][1] for n, (v, f) in a["params"].items())
        and a["tuner_layers"] == b["tuner_layers"] == 0
        and a["peft_config"] == b["peft_config"] is False
    )


def loads(kind: str, folder: str) -> dict:
    """A saved adapter loaded onto a sharded base, three ways: the message (or "accepted") and whether the base is
    unchanged."""
    torch.manual_seed(1)
    saved = get_peft_model(base(kind), config(kind))
    saved.save_pretrained(folder)
    ways = {
        "from_pretrained": lambda m: PeftModel.from_pretrained(m, folder),
        "from_pretrained_trainable": lambda m: PeftModel.from_pretrained(m, folder, is_trainable=True),
        "transformers_load_adapter_trainable": lambda m: m.load_adapter(folder, is_trainable=True),
    }
    out = {}
    for way, load in ways.items():
        model = sharded_base(kind)
        before = snapshot(model)
        try:
            load(model)
            out[way] = {"error": "accepted"}
        except ValueError as exc:
            out[way] = {"error": str(exc)}
        out[way]["unchanged"] = unchanged(before, snapshot(model))
    return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = batches(rank)
    result = {"world_size": dist.get_world_size()}
    for kind in KINDS:
        result[kind] = {before: train(kind, before, data) for before in BEFORE}
        result[kind]["loads"] = loads(kind, os.path.join(out, f"{kind}_adapter_rank{rank}"))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
