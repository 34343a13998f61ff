"""LoRAPrune: prune attention heads and MLP channels while LoRA fine-tuning, then compact the model.

Fine-tunes SmolLM2-135M (embedded, offline) on Shakespeare with a LoRAPrune adapter; ``PruneCallback()`` grows
structured masks on a cubic schedule from LoRA-guided importance. Afterwards the adapter is merged, the pruned heads
and channels are removed physically (``compact``), the small model is saved and reloaded, and its held-out
perplexity and size are compared with the dense model's.

    python examples/loraprune_finetune.py                          # SmolLM2-135M, 40 steps (~minutes on CPU)
    python examples/loraprune_finetune.py --tiny --max-steps 4     # random tiny model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama + byte tokenizer instead of SmolLM2")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--target-sparsity", type=float, default=0.2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default="loraprune_out")
    args = ap.parse_args(argv)

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from prune_peft import LoRAPruneConfig, PruneCallback, compact, load_compacted, perplexity, save_compacted
    from prune_peft.data import shakespeare_texts
    from prune_peft.evaluation import tokenize_stream

    if args.tiny:
        from prune_peft.testing import byte_tokenizer, tiny_causal_lm

        model, tokenizer = tiny_causal_lm(num_hidden_layers=4), byte_tokenizer()
    else:
        from prune_peft.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    heldout = shakespeare_texts("heldout")
    windows = 2 if args.tiny else 8
    ppl_dense = perplexity(model, tokenizer, heldout, seqlen=args.seqlen, max_windows=windows)
    params_dense = sum(p.numel() for p in model.parameters())

    # fixed-length training windows from the training split
    stream = tokenize_stream(shakespeare_texts("train"), tokenizer, max_tokens=args.seqlen * 4 * args.max_steps)
    n = stream.numel() // args.seqlen
    train = [{"input_ids": w.tolist()} for w in stream[: n * args.seqlen].reshape(n, args.seqlen)]

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    model = get_peft_model(model, LoRAPruneConfig(r=8, target_sparsity=args.target_sparsity, prune_every=5))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=5e-4,
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=collate,
        callbacks=[PruneCallback()],
    )
    trainer.train()

    small = compact(model.merge_and_unload())  # physically removes the pruned heads and channels
    save_compacted(small, os.path.join(args.out, "compacted"))
    small = load_compacted(os.path.join(args.out, "compacted"))
    last = [h for h in trainer.state.log_history if "prune/target_sparsity" in h][-1]
    result = {
        "ppl_dense": ppl_dense,
        "ppl_pruned": perplexity(small, tokenizer, heldout, seqlen=args.seqlen, max_windows=windows),
        "params_dense": params_dense,
        "params_pruned": sum(p.numel() for p in small.parameters()),
        "layers": small.config.prune_peft_layers,
        **{k: v for k, v in last.items() if k.startswith("prune/")},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
