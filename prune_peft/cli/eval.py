"""Held-out perplexity (Shakespeare), the sparsity report, and lm-evaluation-harness tasks (``--tasks``).

``--model`` takes every folder the CLI writes: a plain or merged model, a compacted one (uniform: stock config;
non-uniform: ``prune_peft_layers``, read by ``load_compacted``), or an adapter folder (``adapter_config.json``; the
base is ``--base`` or the adapter's ``base_model_name_or_path``). Missing tokenizer files come from the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._common import UsageError, check_positive, print_json

EVAL_SEQLEN, EVAL_WINDOWS = 512, 16  # the same evaluation defaults in `prune` and `eval`

# Hub ids of the embedded aliases: what CLI-written adapters record as base_model_name_or_path (never the local
# cache path of the converted checkpoint, which exists on this machine only). The CLI loads an adapter recording one
# of them on the embedded copy it was trained on (offline; it is the GGUF's dequantized weights, not the Hub's).
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def public_model_id(spec: str) -> str:
    """The id an adapter records for ``--model spec``: an embedded alias's Hub id, anything else as given."""
    return EMBEDDED_HUB_IDS.get(spec, spec)


def local_model_source(model_id: str) -> str:
    """The inverse of :func:`public_model_id`: the embedded alias of a recorded Hub id, anything else unchanged."""
    return next((alias for alias, hub in EMBEDDED_HUB_IDS.items() if hub == model_id), model_id)


@dataclass
class EvalOptions:
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "Model folder (plain, merged, compacted or adapter), Hub id, or embedded alias."},
    )
    base: str | None = field(
        default=None, metadata={"help": "Base model of an adapter folder (default: its base_model_name_or_path)."}
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "Adapter folder to attach to --model (the same as --model ADAPTER --base MODEL)."},
    )
    seqlen: int = field(default=EVAL_SEQLEN, metadata={"help": "Tokens per perplexity window."})
    windows: int = field(default=EVAL_WINDOWS, metadata={"help": "Held-out windows for perplexity."})
    tasks: str | None = field(
        default=None,
        metadata={"help": "lm-evaluation-harness tasks: names and/or local task YAML files, comma-separated."},
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "lm-eval few-shot examples (task default)."})
    limit: float | None = field(default=None, metadata={"help": "lm-eval: examples per task (or fraction)."})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size."})
    json: str | None = field(default=None, metadata={"help": "Also write the full report (per module) to this file."})


def option_types(argv: list[str], config: dict[str, Any]) -> tuple[type, ...]:
    return (EvalOptions,)


def load_any(spec: str, base: str | None = None):
    """``(model, tokenizer, kind)`` for any folder the CLI writes (see the module docstring), a Hub id or alias."""
    import json

    from ..models import load_model, load_tokenizer

    adapter_cfg = os.path.join(spec, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import PeftModel

        import prune_peft  # noqa: F401  (registers the adapter types with peft)

        from ..tuners._registry import refuse_retyped_adapter

        refuse_retyped_adapter(spec)  # a prune_peft adapter whose peft_type was edited, before the base loads
        with open(adapter_cfg, encoding="utf-8") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise UsageError(f"{spec} is an adapter without base_model_name_or_path; pass --base MODEL")
        base = local_model_source(base)
        model = PeftModel.from_pretrained(load_model(base), spec).eval()
        return model, _tokenizer(spec, base), "adapter"
    config = os.path.join(spec, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        from ..pruning.structured import LAYERS_KEY, load_compacted

        if cfg.get(LAYERS_KEY):
            return load_compacted(spec), _tokenizer(spec, base), "compacted (prune_peft_layers)"
        return load_model(spec), _tokenizer(spec, base), "model"
    return load_model(spec), load_tokenizer(spec), "model"


def _tokenizer(folder: str, base: str | None):
    from ..models import DEFAULT_MODEL, load_tokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(folder, n)) for n in names):
        from transformers import AutoTokenizer

        # an adapter folder holds tokenizer files but no config.json, which load_tokenizer's source check requires
        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(base or DEFAULT_MODEL)


def run(opts: EvalOptions) -> int:
    check_positive({"--seqlen": opts.seqlen, "--windows": opts.windows, "--batch-size": opts.batch_size})
    if opts.seqlen < 2:
        raise UsageError(f"--seqlen must be >= 2 (a perplexity window scores tokens 2..seqlen), got {opts.seqlen}")
    if opts.tasks is not None:
        from ..evaluation import LM_EVAL_MISSING, resolve_tasks

        resolve_tasks(opts.tasks)  # bad task specs before the model loads
        try:
            import lm_eval
        except ImportError:
            raise UsageError(LM_EVAL_MISSING) from None

    from .._io import atomic_write_json
    from ..data import shakespeare_texts
    from ..evaluation import perplexity, sparsity_report

    spec, base = opts.model, opts.base
    if opts.adapter is not None:
        if opts.base is not None:
            raise UsageError("--adapter attaches the adapter to --model; --base is for --model ADAPTER, not both")
        if not os.path.isfile(os.path.join(opts.adapter, "adapter_config.json")):
            raise UsageError(f"--adapter {opts.adapter} is not an adapter folder (no adapter_config.json)")
        spec, base = opts.adapter, opts.model
    model, tok, kind = load_any(spec, base)
    if opts.tasks is not None:
        from ..evaluation import lm_eval

        out = opts.json or (
            os.path.join(spec, "lm_eval_results.json") if os.path.isdir(spec) else "lm_eval_results.json"
        )
        limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit
        res = lm_eval(
            model, tok, opts.tasks, num_fewshot=opts.num_fewshot, limit=limit, batch_size=opts.batch_size, output=out
        )
        print_json({"model": opts.model, "kind": kind, "results": res["results"], "path": res["path"]})
        return 0
    rep = sparsity_report(model)
    result = {
        "model": opts.model,
        "kind": kind,
        "perplexity": perplexity(
            model, tok, shakespeare_texts("heldout"), seqlen=opts.seqlen, max_windows=opts.windows
        ),
        "sparsity": rep["sparsity"],
        "sparsity_by_type": {k: v["sparsity"] for k, v in rep["by_type"].items()},
        "not_counted": sorted(rep["other"]),
        "2:4_valid_modules": rep["2:4_valid_modules"],
        "modules": len(rep["modules"]),
    }
    if opts.json:
        atomic_write_json(opts.json, {**result, "sparsity_report": rep})
    print_json(result)
    return 0
