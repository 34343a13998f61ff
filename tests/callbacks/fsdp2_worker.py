"""Worker for test_fsdp2_qtuning_sste.py: S-STE, Q-Tuning and KD on FSDP2-sharded tiny models (torch ``fully_shard``).

Run under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU): each rank trains on its half of every global batch
and writes ``<out>/rank<r>.json`` (+ ``rank0_tensors.pt``, the gathered full weights). The test imports
:func:`run` and calls it with no process group for the one-process reference on the whole batches.

Scenarios (a plain loop driving the same public methods the Trainer/callbacks drive):

- ``sste``: :func:`apply_sste` before ``fully_shard``, 4 AdamW steps with the mask-flip tracker on the sharded weights;
  per layer the β and 2:4 mask recomputed from the DTensor shards vs from the gathered weight; then an in-place
  :func:`finalize_sste` on the shards.
- ``sste_resume``: 2 steps, sharded checkpoint (torch.distributed.checkpoint: model + optimizer) and the β
  (:func:`sste_betas`), a fresh model built from another seed (so ``apply_sste`` recomputes other β), load, restore β,
  2 more steps: must equal ``sste`` after 4 steps bitwise.
- ``qtuning_two_pass`` / ``qtuning_single_pass``: a :class:`QTuningTrainer` (constructed, never ``train()``-ed: the
  Trainer cannot run FSDP2 on CPU) drives the steps: ``get_batch_samples`` (scoring, triage, pruning) and
  ``compute_loss``; thresholds and decisions from the gathered statistics of both ranks.
- ``qtuning_resume``: two-pass, 1 step, checkpoint, fresh model from another seed, load, 1 more step: must equal the
  uninterrupted ``qtuning_two_pass`` run bitwise (Q-Tuning keeps no state across steps; the scoring model does).
- ``kd``: :class:`LogitDistillation` with an FSDP2-sharded teacher: each rank's KD loss on its rows.
- ``refusals`` (2 ranks only): the ValueError messages of ``apply_sste`` after ``fully_shard`` and of a two-pass
  ``QTuningTrainer`` whose KD teacher is sharded.
- ``qlora`` (2 ranks only, needs ``<out>/tiny``, a saved tiny model): why bitsandbytes bases are refused under FSDP2 —
  a 4-bit base (``bnb_4bit_quant_storage=float32``, the compute dtype) with a LoRA adapter, sharded: the loss of one
  fixed batch before and after a forward/backward with no update; an 8-bit base's error; and the refusals.
- ``trainer_cpu`` (2 ranks only): why the Trainer path is not tested on CPU — ``TrainingArguments(fsdp=True,
  fsdp_config={"fsdp_version": 2})`` on gloo trains a DDP-wrapped, unsharded model, and a model sharded by hand
  before the Trainer fails in DDP's parameter broadcast.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

from prune_peft.callbacks.sste import apply_sste, finalize_sste, load_sste_betas, sste_betas, sste_layers
from prune_peft.sparsity.sste import MaskFlipTracker, sste_scale, topk24_mask
from prune_peft.testing import tiny_causal_lm

GLOBAL_BATCH, SEQ, PROMPT = 8, 16, 4


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def batches(steps: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """This rank's rows of ``steps`` global batches (equal-length rows: every rank holds the same token count)."""
    rank, ws = world()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, 260, (GLOBAL_BATCH, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        n = GLOBAL_BATCH // ws
        rows = slice(rank * n, (rank + 1) * n)
        out.append({"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]), "labels": labels[rows]})
    return out


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 per decoder block and at the root (the recipe of docs/distributed.md); no-op in one process."""
    if world()[1] == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world()[1],))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (all-gathered from the shards), on every rank."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def lm_loss(model, batch) -> torch.Tensor:
    return model(**batch).loss  # mean over this rank's tokens; FSDP2 averages the gradients over ranks


def sste_model(seed: int = 0):
    model = tiny_causal_lm(seed=seed, num_hidden_layers=2).train()
    apply_sste(model)  # before sharding (refused after)
    return shard(model)


def train_steps(model, opt, data, loss_fn=lm_loss, tracker: MaskFlipTracker | None = None) -> list[dict]:
    log = []
    for batch in data:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec = {"loss": float(loss.detach())}
        if tracker is not None:
            stats = tracker.update({n: m.weight for n, m in sste_layers(model).items()})
            rec.update(flips=stats["flips"], positions=stats["positions"])
        log.append(rec)
    return log


def checkpoint(model, opt, path: str, load: bool = False) -> None:
    """Sharded model + optimizer state (torch.distributed.checkpoint, one file per rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    if not load:
        dcp.save(state, checkpoint_id=path)
        return
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_sste(out: str) -> tuple[dict, dict]:
    model = sste_model()
    betas0 = sste_betas(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = MaskFlipTracker()
    tracker.update({n: m.weight for n, m in sste_layers(model).items()})
    log = train_steps(model, opt, batches(4), tracker=tracker)
    layers = sste_layers(model)
    checks = {}
    for name, layer in layers.items():
        whole = layer.weight.full_tensor() if hasattr(layer.weight, "full_tensor") else layer.weight
        mask = topk24_mask(layer.weight)
        mask = mask.full_tensor() if hasattr(mask, "full_tensor") else mask
        checks[name] = {
            "beta_from_shards": float(sste_scale(layer.weight)),
            "beta_from_whole": float(sste_scale(whole.detach())),
            "mask_equal": bool(torch.equal(mask, topk24_mask(whole.detach()))),
            "sharded": type(layer.weight).__name__,
        }
    weights = full_state(model)
    finalize_sste(model)
    final = full_state(model)
    result = {"log": log, "betas": betas0, "checks": checks, "layers_after_finalize": len(sste_layers(model))}
    result["betas_after_finalize"] = sste_betas(model)
    return result, {"sste_weights": weights, "sste_final": final}


def run_sste_resume(out: str) -> tuple[dict, dict]:
    data = batches(4)
    model = sste_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, data[:2])
    betas = sste_betas(model)
    path = os.path.join(out, "sste_ckpt")
    checkpoint(model, opt, path)
    resumed = sste_model(seed=5)  # other initial weights: apply_sste computes other β
    recomputed = sste_betas(resumed)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    checkpoint(resumed, opt2, path, load=True)
    load_sste_betas(resumed, betas)
    log = train_steps(resumed, opt2, data[2:])
    return {"log": log, "betas": sste_betas(resumed), "recomputed_betas": recomputed}, {
        "sste_resume_weights": full_state(resumed)
    }


def qtuning_trainer(model, mode: str, out: str, **kwargs):
    from transformers import TrainingArguments

    from prune_peft.callbacks.qtuning import QTuningCallback
    from prune_peft.callbacks.trainers import QTuningTrainer

    args = TrainingArguments(
        output_dir=os.path.join(out, f"qt_{mode}"),
        per_device_train_batch_size=GLOBAL_BATCH // world()[1],
        use_cpu=True,
        ddp_backend="gloo" if world()[1] > 1 else None,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, mode=mode, plot=False)
    trainer = QTuningTrainer(model=model, args=args, callbacks=[cb], **kwargs)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's training loop sets before each step
    return trainer, cb


def qtuning_steps(trainer, opt, data) -> list[float]:
    """One optimizer step per batch, as Trainer.training_step does it (GA = 1)."""
    losses = []
    model = trainer.model
    for batch in data:
        micro, num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        for b in micro:
            loss = trainer.compute_loss(model, dict(b), num_items_in_batch=num_items)
            loss.backward()
            losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    return losses


def qtuning_model(seed: int = 0):
    return shard(tiny_causal_lm(seed=seed, num_hidden_layers=2).train())


def run_qtuning(out: str, mode: str) -> tuple[dict, dict]:
    model = qtuning_model()
    trainer, cb = qtuning_trainer(model, mode, out)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = qtuning_steps(trainer, opt, batches(2, seed=11))
    return {"losses": losses, "records": list(cb.records)}, {f"qtuning_{mode}_weights": full_state(model)}


def run_qtuning_resume(out: str) -> tuple[dict, dict]:
    data = batches(2, seed=11)
    model = qtuning_model()
    trainer, _ = qtuning_trainer(model, "two_pass", out)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    qtuning_steps(trainer, opt, data[:1])
    path = os.path.join(out, "qt_ckpt")
    checkpoint(model, opt, path)
    resumed = qtuning_model(seed=5)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    checkpoint(resumed, opt2, path, load=True)
    trainer2, cb2 = qtuning_trainer(resumed, "two_pass", out)
    losses = qtuning_steps(trainer2, opt2, data[1:])
    return {"losses": losses, "records": list(cb2.records)}, {"qtuning_resume_weights": full_state(resumed)}


def run_kd(out: str) -> tuple[dict, dict]:
    from prune_peft.distill.kd import LogitDistillation

    student = tiny_causal_lm(seed=0, num_hidden_layers=2)
    teacher = shard(tiny_causal_lm(seed=1, num_hidden_layers=2))
    kd = LogitDistillation(student, teacher, temperature=2.0, weight=0.5)
    values = []
    for batch in batches(2, seed=13):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = kd(student(**inputs), batch["labels"])
        values.append({"loss": float(loss.detach()), **kd.last})
    kd.remove()
    return {"values": values}, {}


def run_refusals(out: str) -> tuple[dict, dict]:
    from prune_peft.distill.kd import LogitDistillation

    messages = {}
    try:
        apply_sste(shard(tiny_causal_lm(seed=0, num_hidden_layers=2)))
    except ValueError as exc:
        messages["apply_sste_after_fully_shard"] = str(exc)
    student = tiny_causal_lm(seed=0, num_hidden_layers=2)
    kd = LogitDistillation(student, shard(tiny_causal_lm(seed=1, num_hidden_layers=2)))
    try:
        qtuning_trainer(student, "two_pass", out, compute_loss_func=kd)
    except ValueError as exc:
        messages["qtuning_two_pass_sharded_teacher"] = str(exc)
    kd.remove()
    return {"messages": messages}, {}


def _bnb_model(path: str, bits: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    mesh_model = model.base_model.model
    if world()[1] > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world()[1],))
        for block in mesh_model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def run_qlora(out: str) -> tuple[dict, dict]:
    from prune_peft.callbacks import PruneCallback, SSTECallback
    from prune_peft.distill.kd import LogitDistillation
    from prune_peft.tuners._fsdp import check_sharded_layout
    from prune_peft.tuners.loraprune.pruner import check_sharding

    path = os.path.join(out, "tiny")
    model = _bnb_model(path, 4)
    batch = batches(1, seed=17)[0]
    losses = []
    for _ in range(3):  # forward/backward of the same batch, no optimizer step: the loss must not move
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
    messages = {}
    attempts = {
        "qtuning": lambda: qtuning_trainer(model, "two_pass", out),
        "sste": lambda: SSTECallback().prepare(model),
        "prune_callback": lambda: PruneCallback(method="s-ste").on_train_begin(None, None, None, model=model),
        "kd_teacher": lambda: LogitDistillation(tiny_causal_lm(seed=0, num_hidden_layers=2), model),
        # the tuners' own layout checks, which plain loops and export reach without PruneCallback
        "loraprune_layout": lambda: check_sharding(model),
        "sparse_layout": lambda: check_sharded_layout(model),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValueError as exc:
            messages[name] = str(exc)
    try:
        _bnb_model(path, 8)(**batch)
        int8_error = None
    except Exception as exc:
        int8_error = f"{type(exc).__name__}: {exc}"
    return {"losses_no_update": losses, "messages": messages, "int8_error": int8_error}, {}


def run_trainer_cpu(out: str) -> tuple[dict, dict]:
    from transformers import Trainer, TrainingArguments

    def rows(batch):
        return {
            "input_ids": torch.stack([r["input_ids"] for r in batch]),
            "labels": torch.stack([r["labels"] for r in batch]),
        }

    data = [{"input_ids": r, "labels": r.clone()} for r in batches(1)[0]["input_ids"]]
    common = dict(per_device_train_batch_size=2, max_steps=1, use_cpu=True, ddp_backend="gloo", report_to=[],
                  save_strategy="no", disable_tqdm=True)  # fmt: skip
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer_fsdp"),
        fsdp=True,
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        **common,
    )
    trainer = Trainer(model=tiny_causal_lm(seed=0, num_hidden_layers=2), args=args, train_dataset=data,
                      data_collator=rows)  # fmt: skip
    trainer.train()
    result = {
        "distributed_type": trainer.accelerator.distributed_type.name,
        "wrapped": type(trainer.model_wrapped).__name__,
        "parameter_types": sorted({type(p.data).__name__ for p in trainer.model.parameters()}),
    }
    args = TrainingArguments(output_dir=os.path.join(out, "trainer_presharded"), **common)
    trainer = Trainer(model=shard(tiny_causal_lm(seed=0, num_hidden_layers=2)), args=args, train_dataset=data,
                      data_collator=rows)  # fmt: skip
    try:
        trainer.train()
        result["presharded_error"] = None
    except RuntimeError as exc:
        result["presharded_error"] = str(exc)
    return result, {}


def run(out: str) -> tuple[dict, dict]:
    """Every scenario; returns (JSON-able results, tensors) for this rank."""
    torch.set_num_threads(1)
    results, tensors = {"world_size": world()[1], "rank": world()[0]}, {}
    scenarios = {
        "sste": run_sste,
        "sste_resume": run_sste_resume,
        "qtuning_two_pass": lambda o: run_qtuning(o, "two_pass"),
        "qtuning_single_pass": lambda o: run_qtuning(o, "single_pass"),
        "qtuning_resume": run_qtuning_resume,
        "kd": run_kd,
        "refusals": run_refusals,
        "qlora": run_qlora,
        "trainer_cpu": run_trainer_cpu,  # last: its second Trainer fails on purpose
    }
    for name, fn in scenarios.items():
        if world()[1] == 1 and (name.endswith("_resume") or name in ("refusals", "qlora", "trainer_cpu")):
            continue  # resume is compared with the uninterrupted sharded run; refusals need sharded models
        res, ten = fn(out)
        results[name] = res
        tensors.update(ten)
    return results, tensors


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        results, tensors = run(out)
        rank = dist.get_rank()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
        if rank == 0:
            torch.save(tensors, os.path.join(out, "rank0_tensors.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
