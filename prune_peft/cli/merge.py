"""Merge an adapter into its base and save a plain transformers checkpoint (``prune-peft export --format merged``):
sparse adapters keep every zero of the pruned base. See docs/deploy.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .export import ExportOptions


@dataclass
class MergeOptions(ExportOptions):
    format: str = field(default="merged", metadata={"help": "Always 'merged' (use `prune-peft export` for others)."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (MergeOptions,)


def run(opts: MergeOptions) -> int:
    from . import export

    return export.run(opts, format="merged")
