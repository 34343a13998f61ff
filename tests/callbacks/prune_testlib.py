"""Shared helpers for the PruneCallback tests (also imported by the 2-process DDP worker)."""

import torch


def token_rows(n=32, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 259, (length,), generator=g).tolist()} for _ in range(n)]


def collate(batch):
    ids = torch.tensor([r["input_ids"] for r in batch])
    return {"input_ids": ids, "labels": ids.clone()}


def loraprune_model(seed=0, layers=3, **cfg):
    from peft import get_peft_model

    from prune_peft import LoRAPruneConfig
    from prune_peft.testing import tiny_causal_lm

    base = tiny_causal_lm(seed=seed, num_hidden_layers=layers)
    torch.manual_seed(seed + 100)  # LoRA A init
    cfg.setdefault("exclude_layers", [0])
    cfg.setdefault("r", 4)
    model = get_peft_model(base, LoRAPruneConfig(**cfg))
    with torch.no_grad():  # non-zero B so every LoRA gradient and the estimate are informative
        g = torch.Generator().manual_seed(seed + 200)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def training_args(out, **kw):
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)
