"""Q-Tuning SFT: LoRA fine-tuning with joint sample and token pruning (QTuningSFTTrainer + QTuningCallback).

Trains SmolLM2-135M-Instruct (embedded, offline) on generated arithmetic word problems with trl's SFTTrainer, keeping
25 % of each batch's samples and 50 % of the tokens of misconception samples (the paper's "12.5 % of the data"
budget), then reports the held-out loss and where the EU-plane plots went.

    python examples/qtuning_sft.py                  # embedded SmolLM2-135M, 30 steps (a few minutes on CPU)
    python examples/qtuning_sft.py --tiny --max-steps 2   # random tiny model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama + byte tokenizer instead of SmolLM2")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--sample-ratio", type=float, default=0.25)
    ap.add_argument("--token-ratio", type=float, default=0.5)
    ap.add_argument("--mode", default="two_pass", choices=["two_pass", "single_pass"])
    ap.add_argument("--out", default="qtuning_out")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    from prune_peft import QTuningCallback, QTuningConfig, QTuningSFTTrainer
    from prune_peft.sft_data import arithmetic_problems

    if args.tiny:
        from prune_peft.testing import byte_tokenizer, tiny_causal_lm

        model, tokenizer = tiny_causal_lm(num_hidden_layers=2), byte_tokenizer()
    else:
        from prune_peft.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    train = arithmetic_problems(256, seed=0).remove_columns("answer")
    heldout = arithmetic_problems(32, seed=1).remove_columns("answer")

    # QTuningSFTTrainer = QTuningTrainerMixin + trl's SFTTrainer: it prunes each step's batch and loss as the
    # QTuningCallback decides (for your own trainer class: `class T(QTuningTrainerMixin, YourTrainer)`)
    trainer = QTuningSFTTrainer(
        model,
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            learning_rate=2e-4,
            logging_steps=max(1, args.max_steps // 5),
            max_length=160,
            save_strategy="no",
            report_to=[],
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
            disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[QTuningCallback(QTuningConfig(args.sample_ratio, args.token_ratio, mode=args.mode))],
    )
    trainer.train()
    result = {"eval_loss": trainer.evaluate()["eval_loss"]}
    last = [h for h in trainer.state.log_history if "qtuning/kept_sample_share" in h][-1]
    result.update({k: v for k, v in last.items() if k.startswith("qtuning/")})
    result["plots"] = sorted(os.listdir(os.path.join(args.out, "qtuning")))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
