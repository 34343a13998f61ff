"""PEFT fine-tuning with trl's SFTTrainer: --method lora | sparse_lora | spp | loraprune, optionally with Q-Tuning.

sparse_lora and spp keep the zeros of a pruned base (prune it first with `prune-peft prune`); loraprune prunes
while fine-tuning and saves the physically smaller model to <out>/compacted. The adapter options listed below are
those of the chosen --method (`prune-peft finetune --method spp --help` lists SPP's); the training options are
trl's SFTConfig (every field works, e.g. --gradient_checkpointing, --bf16, --save_strategy steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trl import SFTConfig

from ..callbacks.qtuning import QTuningConfig
from ._common import UsageError, check_data_spec, check_positive, derived_options, given, print_json

# --method -> "module:ConfigClass" of its adapter config (imported when chosen)
METHODS = {
    "lora": "peft:LoraConfig",
    "sparse_lora": "prune_peft.tuners.sparse_lora:SparseLoraConfig",
    "spp": "prune_peft.tuners.spp:SPPConfig",
    "loraprune": "prune_peft.tuners.loraprune:LoRAPruneConfig",
}
# LoRA fields every method exposes; a method's own fields (declared on its config class) are added to these
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")
LORA_ONLY_FIELDS = ("use_dora",)  # plain LoRA only: the sparse methods refuse DoRA


@dataclass
class FinetuneOptions:
    _argument_group_name = "model and data"
    model: str = field(
        default="smollm2-135m", metadata={"help": "Hub id, local path, or embedded alias (smollm2-135m)."}
    )
    method: Literal["lora", "sparse_lora", "spp", "loraprune"] = field(
        default="lora",
        metadata={"help": "Adapter: lora, sparse_lora (SQFT), spp (SPP) or loraprune (LoRAPrune); see docs/."},
    )
    data: str = field(default="arithmetic", metadata={"help": "'arithmetic', 'shakespeare' or a save_to_disk folder."})
    n_train: int = field(default=512, metadata={"help": "Training samples (the first N of a saved dataset)."})
    n_eval: int = field(default=64, metadata={"help": "Held-out samples for eval_loss (0 = skip)."})
    qtuning: bool = field(
        default=False, metadata={"help": "Q-Tuning sample + token pruning (docs/qtuning.md); options --qtuning-*."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --out."})


_SFT_FIELDS = {f.name: f for f in dataclasses.fields(SFTConfig)}


def _sft_field(name: str, default: Any, aliases: list[str] | None = None) -> Any:
    """SFTConfig's field ``name`` (its help text) with this CLI's default and extra flag spellings."""
    metadata = dict(_SFT_FIELDS[name].metadata)
    if aliases:
        metadata["aliases"] = aliases
    return field(default=default, metadata=metadata)


@dataclass
class FinetuneTrainingArguments(SFTConfig):
    """trl's SFTConfig with the CLI's defaults (short runs, no checkpoints) and its short flags (--out, --lr, ...)."""

    _argument_group_name = "training (trl SFTConfig; every field is an option)"

    output_dir: str | None = _sft_field("output_dir", None, ["--out"])
    num_train_epochs: float = _sft_field("num_train_epochs", 1.0, ["--epochs"])
    per_device_train_batch_size: int = _sft_field("per_device_train_batch_size", 8, ["--batch-size"])
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size for evaluation (default: the training batch size)."}
    )
    gradient_accumulation_steps: int = _sft_field("gradient_accumulation_steps", 1, ["--grad-accum"])
    learning_rate: float = _sft_field("learning_rate", 2e-4, ["--lr"])
    max_length: int | None = _sft_field("max_length", 256)
    save_strategy: str = _sft_field("save_strategy", "no")
    gradient_checkpointing: bool = _sft_field("gradient_checkpointing", False)
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on where the GPU supports it, else off)."}
    )
    disable_tqdm: bool | None = _sft_field("disable_tqdm", True)
    seed: int = _sft_field("seed", 0)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            raise UsageError("--out (output_dir) is required: the folder the adapter and report are saved to")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.bf16 is None:
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


# QTuningConfig's fields, each defaulting to None ("not given") so that Q-Tuning options without --qtuning are
# caught; prefixed because names like `mode` or `plot` would be ambiguous among the training options.
QTuningOptions = derived_options(
    QTuningConfig,
    [f.name for f in dataclasses.fields(QTuningConfig)],
    name="QTuningOptions",
    prefix="qtuning_",
    optional=True,
    aliases={"sample_ratio": ["--sample-ratio"], "token_ratio": ["--token-ratio"]},
    group="Q-Tuning (with --qtuning; QTuningConfig)",
)


def adapter_config_class(method: str) -> type:
    import importlib

    if method not in METHODS:
        raise UsageError(f"--method must be one of {sorted(METHODS)}, got {method!r}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def adapter_options(method: str) -> type:
    """The option dataclass of ``method``'s adapter config: LoRA basics + the fields its config class declares."""
    cls = adapter_config_class(method)
    own = [] if method == "lora" else list(inspect.get_annotations(cls))
    names = list(LORA_FIELDS) + (list(LORA_ONLY_FIELDS) if method == "lora" else [])
    names += [n for n in own if n not in names]
    targets = next(f for f in dataclasses.fields(cls) if f.name == "target_modules")
    default_targets = targets.default_factory() if targets.default_factory is not dataclasses.MISSING else None
    return derived_options(
        cls,
        names,
        name=f"{cls.__name__}Options",
        # target_modules is Union[list[str], str] in peft (the parser takes no such Union): a list here, one
        # item 'all-linear' meaning peft's shorthand
        types={"target_modules": list[str]},
        defaults={"lora_alpha": None, "target_modules": list(default_targets or ["all-linear"])},
        aliases={"r": ["--lora-r"]},
        help_suffix={"lora_alpha": "(Default here: 2·r.)"},
        group=f"adapter ({cls.__name__}; --method {method})",
    )


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=config.get("method", "lora"))
    method = pre.parse_known_args(argv)[0].method
    return FinetuneOptions, adapter_options(method), QTuningOptions, FinetuneTrainingArguments


def build_adapter_config(method: str, adapter) -> Any:
    kwargs = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)}
    if kwargs["lora_alpha"] is None:
        kwargs["lora_alpha"] = 2 * kwargs["r"]
    if kwargs["target_modules"] == ["all-linear"]:
        kwargs["target_modules"] = "all-linear"
    return adapter_config_class(method)(task_type="CAUSAL_LM", **kwargs)


def sft_dataset(spec: str, split: str, n: int, seed: int):
    """'arithmetic' / 'shakespeare' → offline prompt/completion data; otherwise a ``save_to_disk`` folder (train)."""
    from .. import sft_data

    if spec == "arithmetic":  # held-out problems come from another seed
        return sft_data.arithmetic_problems(n, seed=seed if split == "train" else seed + 10_000)
    if spec == "shakespeare":
        return sft_data.shakespeare_continuations(split, n=n, seed=seed)
    if split != "train":
        return None
    from datasets import load_from_disk

    ds = load_from_disk(spec)
    return ds.select(range(min(n, len(ds))))


SFT_FORMATS = ("'text'", "'messages'", "'prompt' + 'completion'")


def check_sft_columns(spec: str, columns: list[str], rows: int) -> None:
    """The dataset must be in one of trl's SFT formats (else trl fails later with ``KeyError: 'text'``)."""
    if rows == 0:
        raise UsageError(f"--data {spec!r} has no rows")
    cols = set(columns)
    if "text" in cols or "messages" in cols or {"prompt", "completion"} <= cols:
        return
    raise UsageError(
        f"--data {spec!r} has the columns {sorted(columns)}, none of trl's SFT formats: it needs "
        f"{', '.join(SFT_FORMATS[:-1])} or {SFT_FORMATS[-1]} (rename the columns, e.g. with "
        "Dataset.rename_column, and save_to_disk again)"
    )


def check_completions_fit(train, tokenizer, max_length: int | None) -> None:
    """Refuse a --max-length at which no completion token survives truncation (nothing to train on)."""
    if max_length is None or "prompt" not in train.column_names or "completion" not in train.column_names:
        return
    longest_room = None
    for prompt in train["prompt"]:
        if isinstance(prompt, str):
            n = len(tokenizer(prompt)["input_ids"])
        else:  # conversational prompt: what trl renders before the completion
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        room = max_length - n
        longest_room = room if longest_room is None else max(longest_room, room)
        if room > 0:
            return
    raise UsageError(
        f"--max-length {max_length} truncates every completion: each prompt is at least "
        f"{max_length - (longest_room or 0)} tokens long, so no completion token is left to train on; "
        "raise --max-length or shorten the prompts"
    )


def loraprune_after(trainer, adapter_cfg, out: Path) -> dict:
    """Merge, compact (physically smaller model) and save it to <out>/compacted; report sizes."""
    from ..pruning.structured import compact, compacted_shapes, save_compacted

    model = trainer.model
    logged = [h for h in trainer.state.log_history if "prune/target_sparsity" in h]
    info: dict[str, Any] = {
        "prune_metrics": {k: v for k, v in logged[-1].items() if k.startswith("prune/")} if logged else {}
    }
    if adapter_cfg.structure in ("head+channel", "head", "channel"):
        before = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        small = compact(model.merge_and_unload())
        save_compacted(small, out / "compacted", overwrite=True)  # --out was checked up front
        info.update(
            params_before=before,
            params_after=sum(p.numel() for p in small.parameters()),
            layers=compacted_shapes(small),
            compacted=str(out / "compacted"),
        )
    return info


SPARSE_BASE_FRACTION = 0.3  # zeros in the target weights from which a base counts as pruned


def warn_dense_lora_on_sparse_base(model) -> str | None:
    """Warn (and return the message) when ``--method lora`` gets a pruned base: a plain LoRA update is dense, so
    merging it fills every zero. Sparse = all target linear layers 2:4-valid, or ≥ 30 % zeros in them."""
    import warnings

    from ..evaluation import sparsity_report

    rep = sparsity_report(model)
    n = len(rep["modules"])
    nm = n > 0 and rep["2:4_valid_modules"] == n
    if not (nm or rep["sparsity"] >= SPARSE_BASE_FRACTION):
        return None
    what = "2:4-sparse" if nm else f"{rep['sparsity']:.0%} zeros"
    msg = (
        f"--method lora on a pruned base ({what} in {n} linear layers): plain LoRA's update B·A is dense, and merging "
        "it fills every zero. Use --method sparse_lora (SQFT) or --method spp, which keep the base's sparsity."
    )
    warnings.warn(msg, UserWarning, stacklevel=2)
    return msg


def run(opts: FinetuneOptions, adapter, qtuning, args: FinetuneTrainingArguments) -> int:
    from .._io import atomic_write_json, check_output_dir

    # bad input fails before anything loads
    q_given = given(qtuning, prefix="qtuning_")
    if q_given and not opts.qtuning:
        flags = ", ".join(f"--qtuning-{k.replace('_', '-')}" for k in q_given)
        raise UsageError(f"{flags} need --qtuning (they set Q-Tuning options)")
    qcfg = QTuningConfig(**q_given) if opts.qtuning else None
    check_data_spec("--data", opts.data)
    check_positive(
        {
            "--n-train": opts.n_train,
            "--batch-size": args.per_device_train_batch_size,
            "--grad-accum": args.gradient_accumulation_steps,
            "--lora-r": adapter.r,
            "--max-length": args.max_length,
        }
    )
    peft_config = build_adapter_config(opts.method, adapter)  # bad method settings fail before loading
    out = check_output_dir(args.output_dir, overwrite=opts.overwrite, name="--out")

    from ..callbacks.prune import PruneCallback
    from ..callbacks.qtuning import QTuningCallback
    from ..callbacks.trainers import QTuningSFTTrainer
    from ..models import check_model_source, load_model_and_tokenizer, load_tokenizer
    from .eval import public_model_id

    check_model_source(opts.model, name="--model")
    keep = {"prompt", "completion", "messages", "text"}
    train = sft_dataset(opts.data, "train", opts.n_train, args.seed)
    check_sft_columns(opts.data, train.column_names, len(train))
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    heldout = sft_dataset(opts.data, "heldout", opts.n_eval, args.seed) if opts.n_eval else None
    if heldout is not None:
        heldout = heldout.remove_columns([c for c in heldout.column_names if c not in keep])
    check_completions_fit(train, load_tokenizer(opts.model), args.max_length)  # the tokenizer only, not the model
    model, tok = load_model_and_tokenizer(opts.model)
    sparse_warning = warn_dense_lora_on_sparse_base(model) if opts.method == "lora" else None
    callbacks = ([QTuningCallback(qcfg)] if qcfg else []) + ([PruneCallback()] if opts.method == "loraprune" else [])
    # the Q-Tuning trainer is a plain SFTTrainer without a QTuningCallback, and routes prune metrics to reporters
    trainer = QTuningSFTTrainer(
        model,
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    for cfg in trainer.model.peft_config.values():  # our config object: record the id users load, not a cache path
        cfg.base_model_name_or_path = public_model_id(opts.model)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "model": opts.model,
        "method": opts.method,
        "data": opts.data,
        "qtuning": qcfg.to_dict() if qcfg else None,
        "train_seconds": seconds,
        "steps": trainer.state.global_step,
        "train_loss": next((h["train_loss"] for h in trainer.state.log_history if "train_loss" in h), None),
    }
    if sparse_warning:
        result["warning"] = sparse_warning
    if heldout is not None:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
    logged = [h for h in trainer.state.log_history if "qtuning/kept_sample_share" in h]
    if logged:
        result["qtuning_last_log"] = {k: v for k, v in logged[-1].items() if k.startswith("qtuning/")}
    trainer.save_model(str(out))  # the adapter
    if opts.method == "loraprune":
        result.update(loraprune_after(trainer, peft_config, out))
    atomic_write_json(out / "finetune_report.json", {**result, "log_history": trainer.state.log_history})
    print_json(result)
    return 0
