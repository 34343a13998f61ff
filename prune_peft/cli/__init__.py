"""``prune-peft`` command line: one module per verb (``prune_peft/cli/<verb>.py``).

A verb module has a docstring (its ``--help`` description), ``option_types(argv, config)`` returning the option
dataclasses to parse, and ``run(*options) -> int``. ``main`` imports only the chosen verb's module, so
``prune-peft --help`` loads none of them and each verb loads only what it uses. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["VERBS", "main"]

# verb -> one-line summary for `prune-peft --help` (kept here so the top-level help imports no verb module)
VERBS = {
    "prune": "one-shot prune a model (magnitude, Wanda, SparseGPT) and save it",
    "finetune": "PEFT fine-tuning with trl's SFTTrainer: lora, sparse_lora, spp, loraprune (+ Q-Tuning)",
    "distill": "self-data distillation: the teacher rewrites an SFT set (cached, resumable)",
    "eval": "held-out perplexity, sparsity report, lm-evaluation-harness tasks (--tasks) of any CLI output",
    "export": "write an adapter as a merged, plain-LoRA or compacted (stock-config) checkpoint with a model card",
    "merge": "merge an adapter into its base and save a plain transformers checkpoint",
    "demo": "the end-to-end demo on the embedded model (what `make demo` runs)",
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-peft",
        description="Pruning-aware fine-tuning on transformers / peft / trl.",
        epilog="`prune-peft VERB --help` lists a verb's options; `prune-peft VERB config.yaml` reads them from a "
        "YAML/JSON file (flags after it override the file).",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, summary in VERBS.items():
        sub.add_parser(verb, help=summary, add_help=False)
    return parser


def _error(verb: str | None, exc: BaseException) -> int:
    where = f"prune-peft {verb}" if verb else "prune-peft"
    print(f"{where}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run ``prune-peft VERB [CONFIG.yaml] [--option value ...]``; returns the exit code (2: bad input)."""
    from ._common import parse_options, read_config, split_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"prune-peft {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        return _error(None, ValueError(f"unknown verb {verb!r}; choose one of {', '.join(VERBS)}"))
    try:
        module = importlib.import_module(f"{__name__}.{verb}")
        rest, config_path = split_config(argv[1:])
        config = read_config(config_path) if config_path is not None else {}
        types = module.option_types(rest, config)
        description = (module.__doc__ or VERBS[verb]).strip()
        options = parse_options(f"prune-peft {verb}", types, rest, description=description, config=config)
        return module.run(*options)
    except ValueError as exc:  # bad input: one clear line, no traceback
        return _error(verb, exc)
