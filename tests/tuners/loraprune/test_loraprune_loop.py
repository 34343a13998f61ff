"""The LoRAPrune tuner prunes from any training loop (AdaLoRA-style), with the same result as Trainer + PruneCallback."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "callbacks"))
from prune_testlib import collate, loraprune_model, token_rows, training_args

from prune_peft import PruneCallback
from prune_peft.sparsity.loraprune import n_pruned

STEPS, BATCH = 8, 4
CFG = dict(target_sparsity=0.5, prune_every=2, warmup=0.0)


class Rows(IterableDataset):
    """Rows in a fixed order, so the Trainer's batches are the plain loop's batches (no sampler shuffling)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def _batches(rows):
    return [collate(rows[i : i + BATCH]) for i in range(0, STEPS * BATCH, BATCH)]


def _args(out):
    # constant lr, no clipping, plain (non-fused) AdamW: what the plain loop below does by hand
    return training_args(out, max_steps=STEPS, per_device_train_batch_size=BATCH, lr_scheduler_type="constant",
                         max_grad_norm=0.0, optim="adamw_torch", logging_steps=STEPS)  # fmt: skip


def _loss(model, batch):
    # the Trainer passes the token count of the batch, so the loss is sum / count as here
    num_items = (batch["labels"][..., 1:] != -100).sum()
    return model(**batch, num_items_in_batch=num_items).loss


def _plain_loop(model, rows, args, score_before_step: bool):
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = cls(params, weight_decay=args.weight_decay, **kwargs)  # the Trainer sets it per parameter group
    model.train()
    model.base_model.prepare_pruning(total_steps=STEPS)
    for global_step, batch in enumerate(_batches(rows)):
        _loss(model, batch).backward()
        if score_before_step:
            model.base_model.update_importance(global_step)  # what PruneCallback does in on_pre_optimizer_step
        optimizer.step()
        model.base_model.update_and_allocate(global_step)
        optimizer.zero_grad()


def _prune_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_prune" in k}


def test_plain_loop_reaches_the_trainer_masks_bitwise(tmp_path):
    rows = token_rows(STEPS * BATCH, seed=3)
    trained = loraprune_model(**CFG)
    trainer = Trainer(model=trained, args=_args(tmp_path / "t"), train_dataset=Rows(rows), data_collator=collate,
                      callbacks=[PruneCallback()])  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == STEPS

    looped = loraprune_model(**CFG)
    _plain_loop(looped, rows, _args(tmp_path / "l"), score_before_step=True)

    masks_t, masks_l = trained.base_model.get_masks(), looped.base_model.get_masks()
    assert set(masks_t) == set(masks_l) == {1, 2}
    for i in masks_t:
        for kind in ("units", "channels"):
            assert torch.equal(masks_t[i][kind], masks_l[i][kind]), (i, kind)
        assert int((~masks_l[i]["channels"]).sum()) == n_pruned(0.5, 128) == 64
        assert int((~masks_l[i]["units"]).sum()) == 1
    buffers_t, buffers_l = _prune_buffers(trained), _prune_buffers(looped)
    assert buffers_t and buffers_t.keys() == buffers_l.keys()
    assert all(torch.equal(buffers_t[k], buffers_l[k]) for k in buffers_t)
    # the same pruner state: importance (bitwise), schedule position and level
    state_t = trained.base_model.pruner().state_dict()
    state_l = looped.base_model.pruner().state_dict()
    assert (state_t["last_step"], state_t["level"]) == (state_l["last_step"], state_l["level"]) == (STEPS, 0.5)
    assert state_t["importance"].keys() == state_l["importance"].keys() == {"u1", "c1", "u2", "c2"}
    for key, value in state_t["importance"].items():
        assert torch.equal(value, state_l["importance"][key]), key


def test_update_and_allocate_alone_prunes_to_the_target(tmp_path):
    rows = token_rows(STEPS * BATCH, seed=3)
    model = loraprune_model(**CFG)
    _plain_loop(model, rows, _args(tmp_path), score_before_step=False)  # peft's AdaLoRA order, one call per step
    pruner = model.base_model.pruner()
    assert pruner.last_step == pruner.schedule.final_step == STEPS and pruner.level == 0.5  # ⌈8 − 0.1·8⌉
    for m in model.base_model.get_masks().values():
        assert int((~m["channels"]).sum()) == 64 and int((~m["units"]).sum()) == 1


def test_schedule_length_is_required_and_validated():
    model = loraprune_model(**CFG)
    model(**collate(token_rows(4))).loss.backward()
    masks = _prune_buffers(model)
    with pytest.raises(ValueError, match="schedule_steps"):
        model.base_model.update_and_allocate(0)  # neither config.schedule_steps nor prepare_pruning(total_steps)
    with pytest.raises(ValueError, match="total_steps"):
        model.base_model.prepare_pruning(total_steps=0)
    with pytest.raises(ValueError, match="global_step"):
        model.base_model.prepare_pruning(total_steps=4)
        model.base_model.update_and_allocate(-1)
    with pytest.raises(ValueError, match="structure"):
        model.base_model.prepare_pruning(total_steps=4, structure="channel")
    with pytest.raises(ValueError, match="prune_every"):
        model.base_model.prepare_pruning(total_steps=4, prune_every=0)
    assert all(torch.equal(v, masks[k]) for k, v in _prune_buffers(model).items())  # nothing changed
    # config.schedule_steps is enough on its own; it must fit in the run when the run's length is given
    sized = loraprune_model(schedule_steps=4, **CFG)
    sized(**collate(token_rows(4))).loss.backward()
    sized.base_model.update_and_allocate(3)  # the final event: the target at once
    assert int((~sized.base_model.get_masks()[1]["channels"]).sum()) == 64
    with pytest.raises(ValueError, match="longer than training"):
        sized.base_model.prepare_pruning(total_steps=3)


def test_pruner_state_round_trips():
    model = loraprune_model(**CFG)
    model.base_model.prepare_pruning(total_steps=STEPS)
    for step in range(3):
        model.zero_grad()
        model(**collate(token_rows(4, seed=step))).loss.backward()
        model.base_model.update_and_allocate(step)
    state = model.base_model.pruner().state_dict()
    assert state["last_step"] == 2 and state["importance"]
    fresh = loraprune_model(**CFG)
    fresh.base_model.prepare_pruning(total_steps=STEPS)
    restored = fresh.base_model.pruner()
    restored.load_state_dict(state)
    assert (restored.last_step, restored.level) == (state["last_step"], state["level"])
    assert all(torch.equal(restored.importance[k], v) for k, v in state["importance"].items())
