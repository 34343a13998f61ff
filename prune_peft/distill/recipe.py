"""The small end-to-end recipe used by ``examples/self_distill_recovery.py`` and ``benchmarks/distill.py``.

Tokenize prompt/completion data for causal-LM SFT (prompt tokens masked with −100), fine-tune with LoRA through
the ``transformers.Trainer``, and score held-out answer accuracy with batched greedy generation. Real projects
would use trl's ``SFTTrainer`` for the middle step; the plain Trainer keeps this recipe's moving parts visible.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..sft_data import extract_final_answer
from .generation import generate_texts

__all__ = ["answer_accuracy", "finetune_lora", "render_prompt", "sft_features"]


def render_prompt(tokenizer, prompt: str, chat: bool | None = None) -> str:
    """The prompt as the model sees it: the chat template with a generation prompt when there is one."""
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {prompt}\nAnswer: "


def sft_features(
    dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    response_column: str = "completion",
    chat: bool | None = None,
    max_length: int = 256,
):
    """``input_ids`` / ``labels`` rows: rendered prompt (labels −100) + response + EOS (learned)."""
    from datasets import Dataset

    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, response in zip(dataset[prompt_column], dataset[response_column]):
        p = tokenizer(render_prompt(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


def finetune_lora(
    model: nn.Module,
    features,
    tokenizer,
    *,
    steps: int,
    output_dir: str,
    learning_rate: float = 2e-4,
    batch_size: int = 8,
    r: int = 8,
    target_modules: list[str] | str = "all-linear",
    seed: int = 0,
    compute_loss_func=None,
    merge: bool = True,
) -> nn.Module:
    """LoRA fine-tuning of a copy of ``model`` for exactly ``steps`` optimizer steps; merged back by default."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules)
    )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 10),
        report_to=[],
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    out = peft_model.merge_and_unload() if merge else peft_model
    out.train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return out.eval()


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    dataset,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    chat: bool | None = None,
) -> dict:
    """Greedy answers to held-out problems; correct when ``extract_final_answer`` equals the gold integer."""
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    prompts = [render_prompt(tokenizer, p, chat) for p in dataset[prompt_column]]
    ids = [tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
    texts = generate_texts(model, tokenizer, ids, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gold = list(dataset[answer_column])
    correct = [extract_final_answer(t) == g for t, g in zip(texts, gold)]
    return {
        "accuracy": sum(correct) / len(correct),
        "correct": sum(correct),
        "n": len(correct),
        "examples": [{"output": t, "gold": g} for t, g in list(zip(texts, gold))[:3]],
    }
