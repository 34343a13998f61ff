"""Q-Tuning benchmark: wall time per epoch and held-out loss, SmolLM2-135M + LoRA on offline arithmetic SFT data.

One process, one machine, runs back to back from the same base weights (LoRA r=8 on all linear layers, trl's
SFTTrainer, completion-only loss, one epoch):

- ``full``            every sample;
- ``random_12.5%``    a random eighth of the samples (the same data share as Q-Tuning 25 % × 50 %);
- ``qtuning_25x50``   two-pass Q-Tuning, 25 % of each batch's samples, 50 % of the misconception tokens;
- ``random_25%_same_steps``  a random quarter of the samples at a quarter of the batch size: Q-Tuning's training
  shape (same optimizer steps, same samples per step) with a random instead of an EU-plane choice;
- ``qtuning_25x50_keep_low`` (with ``--with-token-keep-low``) the other reading of the token rule.

Reported: wall time and process CPU time per epoch and their ratios to ``full`` (goal for Q-Tuning: ≤ 0.5×); a
paired timing (``--pairs`` short full / Q-Tuning / floor runs back to back in alternating order, median ratio),
which other load on a shared machine distorts less than two long runs minutes apart; the share of Q-Tuning's time
spent in its scoring forward and in selection (triage, pruning, recount); and the held-out completion loss of each
run (and of the base model).

The floor of two-pass Q-Tuning is what the method cannot avoid: one no-grad scoring forward over every sample plus
training on the kept share. It is measured apart (a score-only pass over the same batches + plain SFT with
Q-Tuning's training shape) and the two-pass run is reported against it (goal ≤ 1.10×) and against full-data SFT.
``--score-dtype bfloat16`` / ``--score-batch-size N`` lower the floor itself (``QTuningConfig`` fields). Writes ``benchmarks/results/qtuning.json`` and the last EU-plane plot next to it.

    python benchmarks/qtuning.py                 # ≈ 10 min on 2 busy CPU cores
    python benchmarks/qtuning.py --n-train 32 --pairs 1   # quicker, noisier
    python benchmarks/qtuning.py --quick         # smoke run into results/quick/

The headline ratio is the paired median (with its spread); the single long-epoch ratio is kept as an alternative.
Stamped by ``_bench.write_results``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from _bench import RESULTS, start_stamp, write_results
from _bench import paired as paired_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_one(name, base, tok, train, heldout, args, callbacks=(), evaluate=True, batch_size=None) -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    from prune_peft import QTuningSFTTrainer  # SFTTrainer + Q-Tuning (plain SFTTrainer when no QTuningCallback)

    out = tempfile.mkdtemp(prefix=f"qtuning-bench-{name}-")
    trainer = QTuningSFTTrainer(
        copy.deepcopy(base),
        args=SFTConfig(
            output_dir=out,
            num_train_epochs=1,
            per_device_train_batch_size=batch_size or args.batch_size,
            per_device_eval_batch_size=16,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_length=args.max_length,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
        ),
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=list(callbacks),
    )
    torch.manual_seed(args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "samples_in_epoch": len(train),
        "optimizer_steps": trainer.state.global_step,
        "wall_s": wall,
        "cpu_s": cpu,
        "train_loss": sum(h["loss"] for h in logs) / len(logs),
    }
    if evaluate:
        result["heldout_loss"] = trainer.evaluate()["eval_loss"]
    shares = [h["qtuning/kept_token_share"] for h in logs if "qtuning/kept_token_share" in h]
    if shares:
        result["kept_sample_share"] = sum(h["qtuning/kept_sample_share"] for h in logs) / len(logs)
        result["kept_response_token_share"] = sum(shares) / len(shares)
        result["misconception_samples_per_step"] = sum(h["qtuning/q2_misconception"] for h in logs) / len(logs)
        result["calibration_samples_per_step"] = sum(h["qtuning/q4_calibration"] for h in logs) / len(logs)
        result["scoring_s"] = sum(h.get("qtuning/scoring_seconds", 0.0) for h in logs)
        result["select_s"] = sum(h.get("qtuning/select_seconds", 0.0) for h in logs)
        plots = sorted(Path(out, "qtuning").glob("eu_plane_step*.png"))
        if plots and evaluate:  # the main run's plot, not a timing run's
            dest = RESULTS / "quick" if args.quick else RESULTS
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(plots[-1], dest / "qtuning_eu_plane.png")
    shutil.rmtree(out, ignore_errors=True)
    print(f"[qtuning bench] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
    return result


def score_only(base, tok, data, args, qt) -> float:
    """The floor's first part: wall seconds of the two-pass scoring forward over every sample (the same batches,
    collator and scoring code as the Q-Tuning run), with no training."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    from prune_peft import QTuningCallback, QTuningSFTTrainer
    from prune_peft.callbacks.qtuning import _to_device

    out = tempfile.mkdtemp(prefix="qtuning-bench-score-")
    trainer = QTuningSFTTrainer(
        copy.deepcopy(base),
        args=SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            report_to=[],
            bf16=False,
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
        ),
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[QTuningCallback(qt)],
    )
    torch.manual_seed(args.seed)
    batches = list(trainer.get_train_dataloader())  # data loading is not part of the floor's scoring
    device = next(trainer.model.parameters()).device
    wall = time.perf_counter()
    for b in batches:
        trainer.qtuning_score_batches([_to_device(b, device)])
    wall = time.perf_counter() - wall
    shutil.rmtree(out, ignore_errors=True)
    print(f"[qtuning bench] score-only: {wall:.4g} s for {len(data)} samples", flush=True)
    return wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=3, help="paired timing repeats (0 = skip)")
    ap.add_argument("--pair-steps", type=int, default=2, help="optimizer steps per paired timing run")
    ap.add_argument(
        "--with-token-keep-low",
        action="store_true",
        help="also run Q-Tuning with token_keep='low' (the other reading of the paper's token rule)",
    )
    ap.add_argument("--score-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="QTuningConfig")
    ap.add_argument("--score-batch-size", type=int, default=None, help="QTuningConfig.score_batch_size")
    ap.add_argument("--quick", action="store_true", help="16 samples, 1 pair; results/quick/")
    ap.add_argument("--out", default=None, help="results file (default: results/qtuning.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_eval, args.pairs, args.pair_steps = 16, 8, 1, 1
    if args.pairs < 1:
        raise ValueError(f"--pairs must be ≥ 1 (the headline ratio is the paired median), got {args.pairs}")

    import torch
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    from prune_peft import QTuningCallback, QTuningConfig
    from prune_peft.models import load_model_and_tokenizer
    from prune_peft.sft_data import arithmetic_problems

    torch.set_num_threads(args.threads)
    stamp = start_stamp(args.threads, args.quick)
    base, tok = load_model_and_tokenizer(args.model)
    train = arithmetic_problems(args.n_train, seed=args.seed).remove_columns("answer")
    heldout = arithmetic_problems(args.n_eval, seed=args.seed + 10_000).remove_columns("answer")

    base_eval = SFTTrainer(
        copy.deepcopy(base),
        args=SFTConfig(
            output_dir=tempfile.mkdtemp(prefix="qtuning-bench-base-"),
            per_device_eval_batch_size=16,
            max_length=args.max_length,
            report_to=[],
            bf16=False,
            disable_tqdm=True,
        ),
        train_dataset=heldout,  # required by SFTTrainer; never trained on
        eval_dataset=heldout,
        processing_class=tok,
    ).evaluate()["eval_loss"]

    # one untimed step first, so one-time costs (allocator, kernel selection) do not land on the first timed run
    run_one("warmup", base, tok, train.select(range(args.batch_size)), heldout, args, evaluate=False)
    qt = QTuningConfig(
        sample_ratio=0.25,
        token_ratio=0.5,
        mode="two_pass",
        score_dtype=args.score_dtype,
        score_batch_size=args.score_batch_size,
    )
    runs = {
        "full": run_one("full", base, tok, train, heldout, args),
        "qtuning_25x50": run_one("qtuning_25x50", base, tok, train, heldout, args, [QTuningCallback(qt)]),
        "random_12.5%": run_one(
            "random_12.5%",
            base,
            tok,
            train.shuffle(seed=args.seed).select(range(max(1, args.n_train // 8))),
            heldout,
            args,
        ),
        # control with Q-Tuning's training shape (same steps, same samples per step) but a random choice of samples
        "random_25%_same_steps": run_one(
            "random_25%_same_steps",
            base,
            tok,
            train.shuffle(seed=args.seed + 1).select(range(max(1, args.n_train // 4))),
            heldout,
            args,
            batch_size=max(1, args.batch_size // 4),
        ),
    }
    if args.with_token_keep_low:
        low = QTuningConfig(sample_ratio=0.25, token_ratio=0.5, mode="two_pass", token_keep="low")
        runs["qtuning_25x50_keep_low"] = run_one(
            "qtuning_25x50_keep_low", base, tok, train, heldout, args, [QTuningCallback(low)]
        )
    # Paired timing: short full / Q-Tuning / floor runs back to back, in alternating order, so that load from other
    # processes on a shared machine hits every side of each ratio alike; the median pair ratio is reported.
    # The floor of two-pass Q-Tuning = scoring every sample once without gradients + training on the kept share:
    # ``score_only`` over the pair's samples + a plain SFT run with Q-Tuning's training shape (a quarter of the
    # samples at a quarter of the batch size: the same optimizer steps, the same kept samples per step).
    pairs = []
    chunk = args.pair_steps * args.batch_size
    # timing runs leave out the end-of-training EU-plane plot (a diagnostic, not the method's compute)
    qt_timed = dataclasses.replace(qt, plot=False)
    kept_bs = max(1, round(args.batch_size * qt.sample_ratio))
    for i in range(args.pairs):
        part = train.select([(i * chunk + j) % len(train) for j in range(chunk)])
        kept = part.select(range(args.pair_steps * kept_bs))
        order = ["full", "qtuning", "floor"]
        timed = {}
        for name in order if i % 2 == 0 else order[::-1]:
            if name == "full":
                timed[name] = run_one(f"pair{i}-full", base, tok, part, heldout, args, evaluate=False)
            elif name == "qtuning":
                cbs = [QTuningCallback(qt_timed)]
                timed[name] = run_one(f"pair{i}-qtuning", base, tok, part, heldout, args, cbs, evaluate=False)
            else:
                score_s = score_only(base, tok, part, args, qt_timed)
                train_kept = run_one(
                    f"pair{i}-floor-train", base, tok, kept, heldout, args, evaluate=False, batch_size=kept_bs
                )
                timed[name] = {
                    "wall_s": score_s + train_kept["wall_s"],
                    "score_s": score_s,
                    "train_s": train_kept["wall_s"],
                }
        q, floor = timed["qtuning"], timed["floor"]
        pairs.append(
            {
                "wall_ratio": q["wall_s"] / timed["full"]["wall_s"],
                "cpu_ratio": q["cpu_s"] / timed["full"]["cpu_s"],
                "scoring_share": q["scoring_s"] / q["wall_s"],
                "select_share": q["select_s"] / q["wall_s"],
                "vs_floor": q["wall_s"] / floor["wall_s"],
                "floor_vs_full": floor["wall_s"] / timed["full"]["wall_s"],
                "floor_score_s": floor["score_s"],
                "floor_train_s": floor["train_s"],
                "qtuning_scoring_s": q["scoring_s"],
                "qtuning_select_s": q["select_s"],
            }
        )

    def median(xs):
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None

    full, q = runs["full"], runs["qtuning_25x50"]
    result = {
        "benchmark": "qtuning",
        "model": args.model,
        "data": f"arithmetic_problems: {args.n_train} train, {args.n_eval} held-out (prompt/completion)",
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "qtuning": qt.to_dict(),
            "peft": "LoRA r=8 all-linear",
            "epochs": 1,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "heldout_loss_base": base_eval,
        "runs": runs,
        "ratios_vs_full": {
            "qtuning_wall": q["wall_s"] / full["wall_s"],
            "qtuning_cpu": q["cpu_s"] / full["cpu_s"],
            "random_12.5%_wall": runs["random_12.5%"]["wall_s"] / full["wall_s"],
        },
        "qtuning_scoring_share_of_wall": q["scoring_s"] / q["wall_s"],
        "paired_timing": {
            "pairs": pairs,
            "median_wall_ratio": median([p["wall_ratio"] for p in pairs]),
            "median_cpu_ratio": median([p["cpu_ratio"] for p in pairs]),
            "median_scoring_share": median([p["scoring_share"] for p in pairs]),
            "wall": paired_stats([p["wall_ratio"] for p in pairs], "Q-Tuning wall time", "full-data wall time"),
            "vs_floor": paired_stats(
                [p["vs_floor"] for p in pairs],
                "Q-Tuning two-pass wall time",
                "floor wall time (score-only pass over every sample + SFT on the kept share)",
            ),
            "floor_vs_full": paired_stats(
                [p["floor_vs_full"] for p in pairs], "floor wall time", "full-data SFT wall time"
            ),
            "median_select_share": median([p["select_share"] for p in pairs]),
            "cpu": paired_stats([p["cpu_ratio"] for p in pairs], "Q-Tuning CPU time", "full-data CPU time"),
        },
        "headline": "paired_timing.median_wall_ratio (ratios_vs_full.qtuning_wall is one long pair, an alternative)",
        "goal": "qtuning_wall <= 0.5",
        "floor": (
            "no-grad scoring of every sample (inference mode, the adapter's current weights, "
            f"score_dtype={qt.score_dtype}, score_batch_size={qt.score_batch_size}) + training on the kept share "
            "(plain SFT, same steps, kept samples per step)"
        ),
        "floor_goal": "paired_timing.vs_floor.median <= 1.10",
    }
    result["floor_goal_met"] = result["paired_timing"]["vs_floor"]["median"] <= 1.10
    write_results("qtuning", result, stamp, quick=args.quick, out=args.out)
    r, pt = result["ratios_vs_full"], result["paired_timing"]
    paired = (
        f"; paired median {pt['median_wall_ratio']:.2f}x wall, {pt['vs_floor']['median']:.2f}x the floor "
        f"(floor {pt['floor_vs_full']['median']:.2f}x full)"
    )
    print(
        f"[qtuning bench] epoch wall time Q-Tuning/full = {r['qtuning_wall']:.2f}x (CPU time {r['qtuning_cpu']:.2f}x"
        f"{paired}); "
        f"held-out loss: base {base_eval:.4f}, full {full['heldout_loss']:.4f}, "
        f"random 12.5% {runs['random_12.5%']['heldout_loss']:.4f}, Q-Tuning 25%x50% {q['heldout_loss']:.4f}, "
        f"random 25% same steps {runs['random_25%_same_steps']['heldout_loss']:.4f}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
