"""The end-to-end demo on the embedded model (what `make demo` runs): prune, recover, compact, report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DemoOptions:
    out: str = field(default="demo_out", metadata={"help": "Output folder (report.json and the stages' outputs)."})
    quick: bool = field(default=False, metadata={"help": "Smaller settings (for smoke tests)."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (DemoOptions,)


def run(opts: DemoOptions) -> int:
    from ..demo import run_demo

    run_demo(opts.out, quick=opts.quick)
    return 0
