"""Export a trained adapter in a format other tools load without prune_peft: ``merged`` (sparse weights, dense
storage), ``lora`` (plain LoRA adapters only) or ``compacted`` (a uniform structured LoRAPrune adapter, physically
shrunk to a stock config). Same function as ``prune_peft.hub.export``; see docs/deploy.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._common import UsageError, print_json


@dataclass
class ExportOptions:
    adapter: str = field(metadata={"help": "Adapter folder written by `prune-peft finetune` (adapter_config.json)."})
    out: str = field(metadata={"help": "Output folder (must not exist unless --overwrite)."})
    format: str = field(default="merged", metadata={"help": "'merged', 'lora' or 'compacted'."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's base model)."})
    dtype: str | None = field(
        default=None, metadata={"help": "dtype of the saved weights: bfloat16, float16, float32 (default: base's)."}
    )
    data: str | None = field(default=None, metadata={"help": "Calibration / training data, named in the card."})
    perplexity: float | None = field(default=None, metadata={"help": "Measured perplexity, stated in the card."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (ExportOptions,)


def run(opts: ExportOptions, format: str | None = None) -> int:
    import os

    from ..hub import FORMATS

    fmt = format or opts.format
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not os.path.isfile(os.path.join(opts.adapter, "adapter_config.json")):
        raise UsageError(f"--adapter {opts.adapter!r} is not an adapter folder (no adapter_config.json)")
    if os.path.exists(opts.out) and os.listdir(opts.out) and not opts.overwrite:
        raise UsageError(f"--out {opts.out!r} exists and is not empty; pass --overwrite to replace it")
    import json

    from ..hub import export
    from .eval import load_any

    with open(os.path.join(opts.adapter, "adapter_config.json"), encoding="utf-8") as f:
        recorded = json.load(f).get("base_model_name_or_path")
    model, tok, _ = load_any(opts.adapter, opts.base)
    info = export(
        model,
        opts.out,
        format=fmt,
        tokenizer=tok,
        dtype=opts.dtype,
        overwrite=opts.overwrite,
        base_model=opts.base or recorded,
        data=opts.data,
        perplexity=opts.perplexity,
    )
    print_json(info)
    return 0
