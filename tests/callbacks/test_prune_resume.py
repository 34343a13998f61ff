"""Resume: k steps, stop, resume to 2k == 2k uninterrupted (masks, adapter weights, importance; CPU)."""

import shutil

import pytest
import torch
from prune_testlib import collate, loraprune_model, token_rows, training_args
from transformers import Trainer, TrainerCallback

from prune_peft import PruneCallback
from prune_peft.callbacks.prune import SIDE_FILE

K = 4


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(out, structure, stop=None, resume=None, **kw):
    layers = 3 if structure == "head+channel" else 2  # element-wise: one prunable block keeps the test quick
    model = loraprune_model(structure=structure, target_sparsity=0.5, prune_every=1, layers=layers)
    callbacks = [PruneCallback()] + ([StopAt(stop)] if stop else [])
    args = training_args(out, max_steps=2 * K, save_strategy="steps", save_steps=K, logging_steps=2, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(64), data_collator=collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PruneCallback))
    return trainer, model, cb.drivers[0]


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("structure", ["head+channel", "unstructured"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, structure):
    _, full_model, full_driver = _run(tmp_path / "full", structure)
    _, _, half_driver = _run(tmp_path / "split", structure, stop=K)
    assert 0 < half_driver.last_step == K < full_driver.last_step
    ckpt = tmp_path / "split" / f"checkpoint-{K}"
    assert ckpt.is_dir()
    if structure == "unstructured":
        assert (ckpt / SIDE_FILE).is_file()  # element-wise moving averages travel next to the checkpoint
    trainer, resumed_model, resumed_driver = _run(tmp_path / "split", structure, resume=str(ckpt))
    assert trainer.state.global_step == 2 * K

    full, resumed = _adapter_state(full_model), _adapter_state(resumed_model)
    assert set(full) == set(resumed)
    masks = [k for k in full if "prune" in k]
    assert masks
    for key in full:
        if "prune" in key:
            assert torch.equal(full[key], resumed[key]), key
        else:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)
    assert resumed_driver.last_step == full_driver.last_step
    assert set(resumed_driver.importance) == set(full_driver.importance)
    for key, value in full_driver.importance.items():
        torch.testing.assert_close(resumed_driver.importance[key], value, rtol=0, atol=1e-6)
    # the resumed run did prune after the restart (the test would be vacuous otherwise)
    if structure == "head+channel":
        ch = resumed_model.base_model.get_masks()[1]["channels"]
        assert int((~ch).sum()) == 64


def test_side_file_is_read_from_args_resume_from_checkpoint_and_required(tmp_path):
    _, _, half_driver = _run(tmp_path / "split", "unstructured", stop=K)
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "split" / f"checkpoint-{K}"), moved)  # not under output_dir any more
    assert (moved / SIDE_FILE).is_file()
    trainer, _, driver = _run(tmp_path / "split", "unstructured", resume=str(moved), resume_from_checkpoint=str(moved))
    assert trainer.state.global_step == 2 * K and driver.last_step > K

    (moved / SIDE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=SIDE_FILE):  # refuses to continue with the importance reset
        _run(tmp_path / "split2", "unstructured", resume=str(moved), resume_from_checkpoint=str(moved))
    assert set(half_driver.importance)  # the state that would have been lost is not empty
