"""Worker for test_qtuning_ddp.py: run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Each rank trains a tiny model with Q-Tuning in both modes for 2 steps (two-pass keeps 1 of 8 samples, single-pass
2 of 8) and writes its triage records to <out>/<mode>_rank<r>.json.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import TrainingArguments

from prune_peft.callbacks.qtuning import QTuningCallback
from prune_peft.callbacks.trainers import QTuningTrainer
from prune_peft.testing import byte_tokenizer, tiny_causal_lm


def rows(tokenizer, n):
    from prune_peft.sft_data import arithmetic_problems

    ds = arithmetic_problems(n, seed=7)
    out = []
    for p, c in zip(ds["prompt"], ds["completion"]):
        pi = tokenizer(p[:40], add_special_tokens=False)["input_ids"]
        ci = tokenizer(c[:40], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": pi + ci, "labels": [-100] * len(pi) + ci})
    return out


def collate(batch):
    length = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        att[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def main(out: str) -> None:
    torch.set_num_threads(1)
    data = rows(byte_tokenizer(), 16)
    # two-pass at 1 of 8 samples: one rank always keeps nothing and must still join the gradient all-reduce
    for mode, ratio in (("two_pass", 0.125), ("single_pass", 0.25)):
        model = tiny_causal_lm(num_hidden_layers=2)
        args = TrainingArguments(
            output_dir=os.path.join(out, mode),
            per_device_train_batch_size=4,
            max_steps=2,
            use_cpu=True,
            ddp_backend="gloo",
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        cb = QTuningCallback(sample_ratio=ratio, token_ratio=0.5, mode=mode, plot=False)
        trainer = QTuningTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[cb])
        trainer.train()
        rank = torch.distributed.get_rank()
        result = {
            "world_size": torch.distributed.get_world_size(),
            "records": list(cb.records),
            "log_history": trainer.state.log_history,
            "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }
        with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
