"""``prune-peft`` command line: prune | eval | demo (more subcommands register themselves below).

Each subcommand is a ``_register_<name>(subparsers)`` function that adds its parser and sets ``func``;
``REGISTRARS`` lists them. Heavy imports happen inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main", "write_json"]


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename): an interrupted run never leaves a truncated report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _calibration_texts(spec: str):
    """'shakespeare' → the training split; a .txt file → its paragraphs; otherwise a datasets path on disk."""
    from .data import shakespeare_texts

    if spec == "shakespeare":
        return shakespeare_texts("train")
    if spec.endswith(".txt") and os.path.isfile(spec):
        text = Path(spec).read_text()
        return [p for p in text.split("\n\n") if p.strip()]
    from datasets import load_from_disk

    return load_from_disk(spec)


def _cmd_prune(args) -> int:
    from .data import shakespeare_texts
    from .evaluation import perplexity
    from .models import load_model_and_tokenizer
    from .pruning.oneshot import check_prune_args, prune

    check_prune_args(args.method, args.sparsity, args.pattern)  # bad input fails before the model loads
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    model, tok = load_model_and_tokenizer(args.model)
    calibration = None if args.method == "magnitude" else _calibration_texts(args.calibration)
    result = {"model": args.model}
    heldout = shakespeare_texts("heldout")
    if args.eval_windows:
        result["ppl_dense"] = perplexity(model, tok, heldout, seqlen=args.seqlen, max_windows=args.eval_windows)
    report = prune(
        model,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        calibration=calibration,
        tokenizer=tok,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        include=args.include,
        exclude=args.exclude,
    )
    if args.eval_windows:
        result["ppl_pruned"] = perplexity(model, tok, heldout, seqlen=args.seqlen, max_windows=args.eval_windows)
    result["prune"] = report.to_dict()
    # save into a temp sibling, then swap in: the output folder is either the old one or complete
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(tmp / "prune_report.json", result)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    summary = {k: v for k, v in result.items() if k != "prune"}
    summary.update(sparsity=report.sparsity, nm_valid=report.nm_valid, seconds=round(report.seconds, 1))
    print(json.dumps(summary, indent=2))
    return 0


def _register_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot prune a model (magnitude, Wanda, SparseGPT) and save it")
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local path, or embedded alias (smollm2-135m)")
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=None, help="fraction removed in [0,1); implied by --pattern N:M")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' (N kept of every M)")
    p.add_argument("--calibration", default="shakespeare", help="'shakespeare', a .txt file, or a saved dataset")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--include", nargs="*", default=None, help="glob patterns of module names to prune")
    p.add_argument("--exclude", nargs="*", default=None, help="glob patterns of module names to keep dense")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for perplexity (0 = skip)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_prune)


def _cmd_eval(args) -> int:
    from .data import shakespeare_texts
    from .evaluation import perplexity, sparsity_report
    from .models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    rep = sparsity_report(model)
    result = {
        "model": args.model,
        "perplexity": perplexity(
            model, tok, shakespeare_texts("heldout"), seqlen=args.seqlen, max_windows=args.windows
        ),
        "sparsity": rep["sparsity"],
        "2:4_valid_modules": rep["2:4_valid_modules"],
        "modules": len(rep["modules"]),
    }
    if args.json:
        write_json(args.json, {**result, "sparsity_report": rep})
    print(json.dumps(result, indent=2))
    return 0


def _register_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out perplexity and sparsity report of a model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the full report here")
    p.set_defaults(func=_cmd_eval)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="the end-to-end demo on the embedded model (what `make demo` runs)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="smaller settings (for smoke tests)")
    p.set_defaults(func=_cmd_demo)


REGISTRARS = [_register_prune, _register_eval, _register_demo]


def _distill_dataset(spec: str, n: int | None, seed: int):
    """'arithmetic' / 'shakespeare' → generated offline SFT data; otherwise a ``save_to_disk`` folder."""
    from . import sft_data

    if spec == "arithmetic":
        return sft_data.arithmetic_problems(n or 1000, seed=seed)
    if spec == "shakespeare":
        return sft_data.shakespeare_continuations("train", n=n, seed=seed)
    from datasets import load_from_disk

    ds = load_from_disk(spec)
    return ds.select(range(min(n, len(ds)))) if n else ds


def _cmd_distill(args) -> int:
    from .distill import distill_stats, self_distill
    from .models import load_model_and_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if args.dataset not in ("arithmetic", "shakespeare") and not os.path.isdir(args.dataset):
        raise ValueError(
            f"--dataset must be 'arithmetic', 'shakespeare' or a saved dataset folder, got {args.dataset!r}"
        )
    if args.n is not None and args.n <= 0:
        raise ValueError(f"--n must be a positive integer, got {args.n}")
    dataset = _distill_dataset(args.dataset, args.n, args.data_seed)
    teacher, tok = load_model_and_tokenizer(args.teacher)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for key in ("temperature", "top_p", "top_k"):
        if getattr(args, key) is not None:
            gen[key] = getattr(args, key)
    cache = Path(args.cache_dir) if args.cache_dir else out.parent / f".{out.name}.cache"
    distilled = self_distill(
        teacher,
        tok,
        dataset,
        template=args.template,
        cache_dir=cache,
        filter=args.filter,
        batch_size=args.batch_size,
        seed=args.seed,
        backend=args.backend,
        overwrite=args.overwrite,
        **gen,
    )
    stats = {"teacher": args.teacher, "dataset": args.dataset, "template": args.template, **distill_stats(distilled)}
    # save into a temp sibling, then swap in: the output folder is either the old one or complete
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    distilled.save_to_disk(str(tmp))
    write_json(tmp / "distill_stats.json", stats)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(json.dumps(stats, indent=2))
    return 0


def _register_distill(sub) -> None:
    p = sub.add_parser("distill", help="self-data distillation: the teacher rewrites an SFT set (cached, resumable)")
    p.add_argument("--teacher", default="smollm2-135m", help="Hub id, local path, or embedded alias (smollm2-135m)")
    p.add_argument("--dataset", default="arithmetic", help="'arithmetic', 'shakespeare' or a save_to_disk folder")
    p.add_argument("--n", type=int, default=None, help="use the first N rows (arithmetic: generate N problems)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--template", default="general", choices=["general", "general_refer", "math"])
    p.add_argument("--filter", default=None, choices=["general", "math", "none"], help="default: by template")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--cache-dir", default=None, help="default: a hidden .<out>.cache folder next to --out")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out and a cache of another configuration")
    p.set_defaults(func=_cmd_distill)


REGISTRARS.append(_register_distill)


def _lora_peft_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")


def _loraprune_peft_config(args):
    from .tuners.loraprune import LoRAPruneConfig

    return LoRAPruneConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM", target_sparsity=args.target_sparsity,
        structure=args.structure, prune_every=args.prune_every,
    )  # fmt: skip


def _loraprune_callbacks(args) -> list:
    from .callbacks.prune import PruneCallback

    return [PruneCallback()]


def _loraprune_after(args, trainer, out: Path) -> dict:
    """Merge, compact (physically smaller model) and save it to <out>/compacted; report sizes."""
    from .pruning.structured import compact, compacted_shapes, save_compacted

    model = trainer.model
    logged = [h for h in trainer.state.log_history if "prune/target_sparsity" in h]
    info = {"prune_metrics": {k: v for k, v in logged[-1].items() if k.startswith("prune/")} if logged else {}}
    if args.structure in ("head+channel", "head", "channel"):
        before = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        small = compact(model.merge_and_unload())
        save_compacted(small, out / "compacted")
        info.update(
            params_before=before,
            params_after=sum(p.numel() for p in small.parameters()),
            layers=compacted_shapes(small),
            compacted=str(out / "compacted"),
        )
    return info


# --method name -> builder of the peft config from the parsed args (other methods register here)
FINETUNE_METHODS = {"lora": _lora_peft_config, "loraprune": _loraprune_peft_config}
# --method name -> extra Trainer callbacks, and a post-training step returning extra report fields
FINETUNE_CALLBACKS = {"loraprune": _loraprune_callbacks}
FINETUNE_AFTER = {"loraprune": _loraprune_after}


def _sft_dataset(spec: str, split: str, n: int, seed: int):
    """'arithmetic' / 'shakespeare' → offline prompt/completion data; otherwise a ``save_to_disk`` folder (train)."""
    from . import sft_data

    if spec == "arithmetic":  # held-out problems come from another seed
        return sft_data.arithmetic_problems(n, seed=seed if split == "train" else seed + 10_000)
    if spec == "shakespeare":
        return sft_data.shakespeare_continuations(split, n=n, seed=seed)
    if split != "train":
        return None
    from datasets import load_from_disk

    ds = load_from_disk(spec)
    return ds.select(range(min(n, len(ds))))


def _cmd_finetune(args) -> int:
    import time

    import torch

    from .callbacks.qtuning import QTuningCallback, QTuningConfig
    from .models import load_model_and_tokenizer

    # bad input fails before anything loads
    if not args.qtuning and (args.sample_ratio is not None or args.token_ratio is not None):
        raise ValueError("--sample-ratio/--token-ratio need --qtuning")
    pairs = (("sample_ratio", args.sample_ratio), ("token_ratio", args.token_ratio))
    ratios = {k: v for k, v in pairs if v is not None}
    qcfg = QTuningConfig(mode=args.qtuning_mode, **ratios) if args.qtuning else None
    if args.data not in ("arithmetic", "shakespeare") and not os.path.isdir(args.data):
        raise ValueError(f"--data must be 'arithmetic', 'shakespeare' or a saved dataset folder, got {args.data!r}")
    for name in ("n_train", "batch_size", "grad_accum", "lora_r", "max_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    FINETUNE_METHODS[args.method](args)  # bad method settings (e.g. --target-sparsity) fail before loading
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    from trl import SFTConfig, SFTTrainer

    keep = {"prompt", "completion", "messages", "text"}
    train = _sft_dataset(args.data, "train", args.n_train, args.seed)
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    heldout = _sft_dataset(args.data, "heldout", args.n_eval, args.seed) if args.n_eval else None
    if heldout is not None:
        heldout = heldout.remove_columns([c for c in heldout.column_names if c not in keep])
    model, tok = load_model_and_tokenizer(args.model)
    cuda = torch.cuda.is_available()
    cfg = SFTConfig(
        output_dir=str(out),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=args.report_to,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model,
        args=cfg,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tok,
        peft_config=FINETUNE_METHODS[args.method](args),
        callbacks=([QTuningCallback(qcfg)] if qcfg else []) + FINETUNE_CALLBACKS.get(args.method, lambda _: [])(args),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    result = {
        "model": args.model,
        "method": args.method,
        "data": args.data,
        "qtuning": qcfg.to_dict() if qcfg else None,
        "train_seconds": seconds,
        "steps": trainer.state.global_step,
        "train_loss": next((h["train_loss"] for h in trainer.state.log_history if "train_loss" in h), None),
    }
    if heldout is not None:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
    logged = [h for h in trainer.state.log_history if "qtuning/kept_sample_share" in h]
    if logged:
        result["qtuning_last_log"] = {k: v for k, v in logged[-1].items() if k.startswith("qtuning/")}
    trainer.save_model(str(out))  # the adapter
    if args.method in FINETUNE_AFTER:
        result.update(FINETUNE_AFTER[args.method](args, trainer, out))
    write_json(out / "finetune_report.json", {**result, "log_history": trainer.state.log_history})
    print(json.dumps(result, indent=2))
    return 0


def _register_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="PEFT fine-tuning with trl's SFTTrainer (+ Q-Tuning data pruning)")
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local path, or embedded alias (smollm2-135m)")
    p.add_argument("--method", default="lora", choices=sorted(FINETUNE_METHODS))
    p.add_argument("--data", default="arithmetic", help="'arithmetic', 'shakespeare' or a save_to_disk folder")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=64, help="held-out samples for eval_loss (0 = skip)")
    p.add_argument("--qtuning", action="store_true", help="Q-Tuning sample + token pruning (docs/qtuning.md)")
    p.add_argument("--sample-ratio", type=float, default=None, help="kept share of each batch's samples, (0, 1]")
    p.add_argument("--token-ratio", type=float, default=None, help="kept share of misconception tokens, (0, 1]")
    p.add_argument("--qtuning-mode", default="two_pass", choices=["two_pass", "single_pass"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-sparsity", type=float, default=0.5, help="loraprune: final sparsity (docs/loraprune.md)")
    p.add_argument("--structure", default="head+channel", help="loraprune: head+channel|head|channel|unstructured|N:M")
    p.add_argument("--prune-every", type=int, default=10, help="loraprune: optimizer steps between mask updates")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard wandb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_finetune)


REGISTRARS.append(_register_finetune)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="prune-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"prune-peft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
