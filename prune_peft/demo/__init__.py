"""The end-to-end demo that ``make demo`` (``prune-peft demo``) runs on the embedded SmolLM2-135M model.

One module per stage; each stage is a function ``stage(ctx) -> dict`` listed in :data:`STAGES`. Stages append to
one report (``<out>/report.json``, rewritten atomically after every stage so an interrupted demo still leaves a
valid report). Entry point: :func:`run_demo`.
"""

from __future__ import annotations

import time
from pathlib import Path

from .._io import atomic_write_json
from ._context import DemoContext, log
from .export import stage_export_compacted
from .load import stage_load
from .loraprune import stage_loraprune
from .oneshot import stage_sparsegpt_50, stage_wanda_24
from .sparse_lora import stage_sparse_lora

__all__ = ["STAGES", "DemoContext", "run_demo"]

STAGES = [
    ("load", stage_load),
    ("wanda_2:4", stage_wanda_24),
    ("sparsegpt_50%", stage_sparsegpt_50),
    ("sparse_lora", stage_sparse_lora),
    ("loraprune", stage_loraprune),
    ("export_compacted", stage_export_compacted),  # last: the LoRAPrune result, stock-loadable
]


def run_demo(out: str | Path = "demo_out", quick: bool = False, stages: list[str] | None = None) -> dict:
    """Run the demo stages (all, or ``stages``; ``load`` always runs) and return the report written to ``out``."""
    known = [name for name, _ in STAGES]
    if stages is not None and (isinstance(stages, str) or any(s not in known for s in stages)):
        raise ValueError(f"stages must be a list of stage names from {known}, got {stages!r}")
    ctx = DemoContext(out=Path(out), quick=quick)
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, fn in STAGES:
        if stages is not None and name not in stages and name != "load":
            continue
        t0 = time.perf_counter()
        ctx.report[name] = fn(ctx)
        ctx.report[name]["stage_seconds"] = time.perf_counter() - t0
        atomic_write_json(ctx.out / "report.json", ctx.report)
    ctx.report["total_seconds"] = time.perf_counter() - start
    atomic_write_json(ctx.out / "report.json", ctx.report)
    log(f"done in {ctx.report['total_seconds']:.0f}s; report written to {ctx.out / 'report.json'}")
    return ctx.report
