"""Worker for test_prune_ddp.py: run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Each rank trains a tiny LoRAPrune model (pruning at every step) and records, after every optimizer step, its masks
and a checksum of its moving-average importance into <out>/rank<r>.json.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from prune_testlib import collate, loraprune_model, token_rows, training_args
from transformers import Trainer, TrainerCallback

from prune_peft import PruneCallback


class MaskLog(TrainerCallback):
    def __init__(self, prune_cb):
        self.prune_cb = prune_cb
        self.records = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        masks = model.base_model.get_masks()
        driver = self.prune_cb.drivers[0]
        self.records.append(
            {
                "step": state.global_step,
                "masks": {str(i): {k: v.int().tolist() for k, v in m.items()} for i, m in masks.items()},
                "importance": {k: v.double().sum().item() for k, v in driver.importance.items()},
            }
        )


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = loraprune_model(target_sparsity=0.5, prune_every=1, warmup=0.0)
    cb = PruneCallback()
    log = MaskLog(cb)
    args = training_args(out, max_steps=4, per_device_train_batch_size=2, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(32), data_collator=collate, callbacks=[cb, log])
    trainer.train()
    rank = torch.distributed.get_rank()
    result = {
        "world_size": torch.distributed.get_world_size(),
        "records": log.records,
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
