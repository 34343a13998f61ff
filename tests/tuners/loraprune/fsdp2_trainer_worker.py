"""Worker for test_fsdp2.py's GPU test: transformers.Trainer + accelerate FSDP2 + PruneCallback, one rank on CUDA.

Run under `torch.distributed.run --nproc_per_node 1`. accelerate applies FSDP only to GPU-type backends (on CPU it
silently trains with DDP), so the Trainer path of FSDP2 is tested where a GPU is lent. Writes <out>/trainer.pt: the
masks, the pruner state, whether the base weights were DTensor shards during training.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "callbacks"))

import torch
from prune_testlib import collate, loraprune_model, token_rows, training_args
from transformers import Trainer, TrainerCallback

from prune_peft import PruneCallback, _dist

STEPS, BATCH = 4, 4
CFG = dict(target_sparsity=0.5, prune_every=1, warmup=0.0)


class Seen(TrainerCallback):
    """Records whether the scored base weights are DTensor shards while training runs."""

    sharded = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weight = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight
        Seen.sharded = Seen.sharded or _dist.is_sharded(weight)


def run(out: str, fsdp: bool) -> dict:
    model = loraprune_model(**CFG)
    extra = {}
    if fsdp:
        extra = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})  # fmt: skip
    args = training_args(out, max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=False,
                         lr_scheduler_type="constant", max_grad_norm=0.0, **extra)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(STEPS * BATCH, seed=3), data_collator=collate,
                      callbacks=[PruneCallback(), Seen()])  # fmt: skip
    trainer.train()
    tuner = trainer.model.base_model
    masks = {f"{i}.{k}": v.cpu() for i, m in tuner.get_masks().items() for k, v in m.items()}
    return {"masks": masks, "state": tuner.pruner().state_dict(), "sharded": Seen.sharded}


if __name__ == "__main__":
    torch.manual_seed(0)
    result = run(sys.argv[1], fsdp=sys.argv[2] == "fsdp")
    torch.save(result, os.path.join(sys.argv[1], f"trainer_{sys.argv[2]}.pt"))
