"""Sharing sparse adapters: every model card prune_peft writes, Hub pushes, and exports any transformers/peft
user can load. Cards are built with ``huggingface_hub.ModelCard`` / ``ModelCardData``.

* ``model.save_pretrained(dir)`` on a SparseLoRA/SPP model writes the adapter weights *and* masks
  (``lora_sparse_mask``, bit-packed) plus a model card with base model, sparsity pattern and ratio, method, and the
  ``import prune_peft`` load snippet (:func:`write_adapter_card`, called from the adapter config's own
  ``save_pretrained``).
* :func:`push_to_hub`: save (card included) and upload. Plain ``model.push_to_hub(repo)`` uploads the same adapter
  and masks, but transformers' ``PushToHubMixin`` replaces ``README.md`` with the Hub's card after saving, so the
  sparsity section is only kept by this helper.
* :func:`export`: ``format="merged"`` — a plain, sparse transformers checkpoint (the adapters merged with every zero
  kept) with its own card (:func:`merged_card`); ``format="lora"`` — a standard LoRA adapter, only when the adapter
  really is plain LoRA.

Imports from ``prune_peft.tuners`` happen inside functions: the tuners call :func:`write_adapter_card` at save time,
so neither side needs the other at import time.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_dir, atomic_write_text, check_output_dir

__all__ = [
    "FORMATS",
    "card_section",
    "export",
    "export_card",
    "is_plain_lora",
    "merged_card",
    "push_to_hub",
    "stock_reload",
    "write_adapter_card",
]

FORMATS = ("merged", "lora", "compacted")


def is_plain_lora(config) -> bool:
    """True when a peft config describes a plain ``ΔW = s·B A`` LoRA adapter that any LoRA loader applies correctly.

    Adapter types that mask or rescale the update (SPARSE_LORA, SPP, DoRA, …) are not; a config class may opt in with
    a class attribute ``exportable_as_lora = True`` (for types whose adapter is plain LoRA on a masked base).
    """
    if getattr(type(config), "exportable_as_lora", False):
        return True
    from peft import LoraConfig
    from peft.utils import PeftType

    return (
        type(config) is LoraConfig
        and config.peft_type == PeftType.LORA
        and not getattr(config, "use_dora", False)
        and not getattr(config, "lora_bias", False)
    )


# ------------------------------------------------------------------------------------------------- model cards

_CARD_BEGIN = "<!-- prune_peft:begin -->"
_CARD_END = "<!-- prune_peft:end -->"
_METHOD_NAMES = {"sparse_lora": "SparseLoRA (SQFT SparsePEFT)", "spp": "SPP"}


# The load snippet of every checkpoint that stock transformers loads with nothing else installed.
_STOCK_USAGE = [
    "```python",
    "from transformers import AutoModelForCausalLM",
    'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")',
    "```",
    "",
]


def _load_block(peft_type: str, base: str | None, after: str) -> str:
    """The card's load instructions: ``import prune_peft`` first (it registers ``peft_type`` with peft)."""
    return (
        f"Load it with `import prune_peft` first: it registers the `{peft_type}` adapter type with peft. Without it, "
        f"`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and lm-eval's `peft=` fail with "
        f"`KeyError: '{peft_type}'` (`pip install prune-peft`).\n\n"
        "```python\n"
        "import prune_peft  # registers the adapter type with peft: needed before any load\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base or "<the base model>"}")\n'
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")\n'
        f"{after}"
        "```\n"
    )


def card_section(config) -> str | None:
    """The model-card text describing a prune_peft adapter (None when no summary is known).

    SparseLoRA / SPP: the summary (``config._pp_card``: method, pattern, sparsity, counts) is filled by the tuner when
    it injects. LoRAPrune: the section is built from the config (structure, target sparsity, uniform).
    """
    base = config.base_model_name_or_path or None
    peft_type = config.peft_type.value
    if peft_type == "LORAPRUNE":
        uniform = getattr(config, "uniform", False)
        return (
            "## Structured pruning adapter (prune_peft LoRAPrune)\n\n"
            f"- method: LoRAPrune (`{peft_type}`), structure `{config.structure}`, "
            f"target sparsity {config.target_sparsity}\n"
            f"- base model: {f'`{base}`' if base else 'not recorded (the base had no Hub id or path)'}\n"
            "- the head/channel masks travel in `adapter_model.safetensors`; "
            + (
                "`uniform=True`: every block keeps the same sizes, so `prune_peft.hub.export(model, out, "
                'format="compacted")` writes a stock checkpoint that `AutoModelForCausalLM.from_pretrained` loads '
                "without prune_peft.\n\n"
                if uniform
                else "non-uniform: a compacted model loads only through `prune_peft.load_compacted` (see docs/deploy.md)."
                "\n\n"
            )
            + _load_block(
                peft_type, base, "small = prune_peft.compact(model.merge_and_unload())  # physically smaller\n"
            )
        )
    card = getattr(config, "_pp_card", None)
    if not card:
        return None
    name = _METHOD_NAMES.get(card["method"], card["method"])
    return (
        "## Sparsity-preserving adapter (prune_peft)\n\n"
        f"- method: {name} (`{peft_type}`)\n"
        f"- base model: {f'`{base}`' if base else 'not recorded (the base had no Hub id or path)'}\n"
        f"- sparsity pattern: {card['pattern']}\n"
        f"- sparsity ratio of the adapted weights: {card['sparsity']:.4f} "
        f"({card['modules']} modules, {card['weights']} weights)\n"
        "- merging (`merge_and_unload`) keeps every zero of the pruned base; the masks travel in "
        "`adapter_model.safetensors` (`lora_sparse_mask`, bit-packed).\n\n"
        + _load_block(peft_type, base, "merged = model.merge_and_unload()  # sparse, same zeros as the base\n")
    )


def write_adapter_card(directory: str | os.PathLike, config) -> None:
    """Add (or refresh) the prune_peft section and tags of ``README.md`` in ``directory``, atomically.

    Called by the prune_peft adapter configs' ``save_pretrained`` (peft saves the config after writing its own
    card), so ``PeftModel.save_pretrained`` and :func:`push_to_hub` both produce it. Idempotent: a second save
    replaces the section between its markers instead of adding another.
    """
    section = card_section(config)
    if section is None:
        return
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    summary = getattr(config, "_pp_card", None) or {"method": "loraprune", "pattern": "structured"}
    tags = set(card.data.tags or []) | {"prune_peft", "sparse", summary["method"].replace("_", "-"), "peft"}
    if summary["pattern"] not in ("unstructured", "structured"):
        tags.add(f"sparsity-{summary['pattern'].replace(':', 'of')}")
    card.data.library_name = card.data.library_name or "peft"
    base = config.base_model_name_or_path
    if base and not os.path.isabs(base) and not card.data.base_model:
        card.data.base_model = base  # a Hub id (the Hub refuses local paths in base_model)
    if not card.data.base_model or os.path.isabs(str(card.data.base_model)):
        card.data.base_model = None  # peft's card has `base_model: ''` (no recorded base) or a local path
    # peft tags 'base_model:adapter:<base>'; keep it only for the Hub id kept above (never empty, never a path)
    tags = {t for t in tags if not t.startswith("base_model:adapter:") or t[19:] == card.data.base_model}
    card.data.tags = sorted(tags)
    text = card.text
    block = f"{_CARD_BEGIN}\n{section}{_CARD_END}"
    if _CARD_BEGIN in text and _CARD_END in text:
        head, _, rest = text.partition(_CARD_BEGIN)
        _, _, tail = rest.partition(_CARD_END)
        text = head + block + tail
    else:
        lines = text.split("\n")
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
        if title is None:
            text = block + "\n\n" + text
        else:
            lines.insert(title + 1, "\n" + block + "\n")
            text = "\n".join(lines)
    card.text = text
    atomic_write_text(path, str(card))


def merged_card(summary: dict, base: str | None, methods: list[str]):
    """The ``huggingface_hub.ModelCard`` of a merged sparse checkpoint written by :func:`export`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers", tags=["prune_peft", "sparse", *(m.replace("_", "-") for m in methods)]
    )
    lines = [
        "# Sparse model (adapters merged by prune_peft)",
        "",
        f"- base model: `{base or 'unknown'}`",
        f"- merged adapter type(s): {', '.join(methods) or 'none'}",
        f"- sparsity of the linear layers: {summary['sparsity']:.4f} ({summary['zeros']} zeros / {summary['numel']})",
    ]
    if "2:4_valid_modules" in summary:
        lines.append(f"- 2:4-valid linear layers: {summary['2:4_valid_modules']} of {len(summary['modules'])}")
    lines += [
        "",
        "A plain transformers checkpoint: the zeros are stored as zeros, nothing to import.",
        "",
        *_STOCK_USAGE,
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------- stock reloading

_STOCK_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
out = {"params": sum(p.numel() for p in model.parameters()),
       "prune_peft_imported": "prune_peft" in sys.modules}
if sys.argv[2]:
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print(json.dumps(out))
"""


def stock_reload(path: str | os.PathLike, input_ids: torch.Tensor | None = None, timeout: float = 600) -> dict:
    """Load ``path`` with plain ``AutoModelForCausalLM.from_pretrained`` in a fresh Python process that never
    imports prune_peft (what vLLM, TGI or a user without the library would do).

    Returns ``{"params": int, "logits": float32 tensor or None}`` (logits of ``input_ids`` when given).
    RuntimeError with the child's last lines when the stock loader fails, or when prune_peft got imported.
    ValueError for a prune_peft adapter folder whose ``peft_type`` was edited (transformers would load it as plain LoRA).
    """
    from .tuners._registry import refuse_retyped_adapter

    refuse_retyped_adapter(path)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = logits_path = ""
        if input_ids is not None:
            ids_path, logits_path = os.path.join(tmp, "ids.pt"), os.path.join(tmp, "logits.pt")
            torch.save(input_ids.detach().cpu(), ids_path)
        result = run_stock_script(_STOCK_LOAD, path, [ids_path, logits_path], timeout=timeout)
        result["logits"] = torch.load(logits_path) if logits_path else None
    return result


def run_stock_script(script: str, path: str | os.PathLike, args: list[str], timeout: float = 600) -> dict:
    """Run ``script`` (which loads ``path`` with stock transformers and prints a JSON line with a
    ``prune_peft_imported`` flag) in a fresh interpreter; its JSON result without the flag.

    RuntimeError with the child's last lines when it fails, or when prune_peft got imported.
    """
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"stock from_pretrained({str(path)!r}) failed in a fresh process:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.pop("prune_peft_imported"):
        raise RuntimeError(f"loading {str(path)!r} imported prune_peft: the checkpoint is not stock")
    return result


# ------------------------------------------------------------------------------------------------- export, push


def _check_peft_model(model, fn: str) -> dict:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        raise ValueError(
            f"{fn} expects a PeftModel (the result of get_peft_model / PeftModel.from_pretrained), "
            f"got model={type(model).__name__}"
        )
    return peft_config


ENGINES_STOCK = (
    "transformers `AutoModelForCausalLM.from_pretrained` (no prune_peft import, no trust_remote_code), and every "
    "engine that reads a transformers checkpoint of this architecture (vLLM, TGI, SGLang, llama.cpp's "
    "convert_hf_to_gguf.py)"
)


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _uniform_counts(model: nn.Module) -> dict | None:
    """Kept (KV units, channels) of every block of a structured LoRAPrune adapter, or None when not LoRAPrune."""
    from .tuners.loraprune import LoRAPruneModel

    tuner = next((m for m in model.modules() if isinstance(m, LoRAPruneModel)), None)
    if tuner is None:
        return None
    adapter = tuner.active_adapters[0]
    if not tuner.peft_config[adapter].structured:
        return None
    masks = tuner.get_masks(adapter)
    counts: dict[str, set[int]] = {"units": set(), "channels": set()}
    from . import _hf

    config = _hf.text_config(_hf.base_model(model))
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for info in tuner.prune_blocks(adapter):
        m = masks.get(info.index, {})
        counts["units"].add(int(m["units"].sum()) if "units" in m else n_kv)
        counts["channels"].add(int(m["channels"].sum()) if "channels" in m else config.intermediate_size)
    return counts


def export_card(
    fmt: str,
    summary: dict,
    *,
    base: str | None,
    methods: list[str],
    data: str | None = None,
    perplexity: float | None = None,
    engines: str = ENGINES_STOCK,
    extra: list[str] | None = None,
):
    """The ``huggingface_hub.ModelCard`` of an exported checkpoint: method, sparsity per module type, base model,
    data named by the user, perplexity when measured, and which engines can load it."""
    from huggingface_hub import ModelCard, ModelCardData

    kw = {"base_model": base} if base and not os.path.isabs(base) else {}
    data_card = ModelCardData(
        library_name="transformers",
        tags=["prune_peft", "sparse" if fmt == "merged" else "pruned", *(m.replace("_", "-") for m in methods)],
        **kw,
    )
    title = {"merged": "Sparse model (adapters merged by prune_peft)", "compacted": "Structurally pruned model"}
    lines = [
        f"# {title.get(fmt, 'Model exported by prune_peft')}",
        "",
        f"- base model: `{base or 'unknown'}`",
        f"- method: {', '.join(methods) or 'none'} (exported as `{fmt}`)",
        f"- calibration / training data: {data or 'not stated'}",
    ]
    if fmt == "compacted":
        lines.append(
            f"- parameters: {summary['params_after']:,} (from {summary['params_before']:,}; "
            f"{1 - summary['params_after'] / max(summary['params_before'], 1):.4f} removed)"
        )
        lines.append(
            "- removed per module type (fraction of the decoder blocks' weights): "
            + ", ".join(f"{k} {v:.4f}" for k, v in summary["removed_by_type"].items())
        )
    else:
        lines.append(
            f"- sparsity of the pruned modules (linear layers in the decoder blocks): {summary['sparsity']:.4f} "
            f"({summary['zeros']} zeros / {summary['numel']})"
        )
        by_type = summary.get("by_type") or {}
        if by_type:
            lines.append("- per module type: " + ", ".join(f"{k} {v['sparsity']:.4f}" for k, v in by_type.items()))
        if "2:4_valid_modules" in summary:
            lines.append(f"- 2:4-valid linear layers: {summary['2:4_valid_modules']} of {len(summary['modules'])}")
        other = summary.get("other") or {}
        if other:
            desc = ", ".join(f"{k} (tied to {v['tied']})" if v.get("tied") else k for k, v in other.items())
            lines.append(f"- not pruned, not counted above: {desc}")
    if perplexity is not None:
        lines.append(f"- perplexity (measured at export): {perplexity:.3f}")
    lines += [f"- loads with: {engines}", *(extra or [])]
    lines += [
        "",
        "A plain transformers checkpoint, nothing to import:",
        "",
        *_STOCK_USAGE,
    ]
    return ModelCard(f"---\n{data_card.to_yaml()}\n---\n\n" + "\n".join(lines))


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "merged",
    *,
    tokenizer=None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    data: str | None = None,
    perplexity: float | None = None,
) -> dict:
    """Write ``model`` (a ``PeftModel``) to ``out`` in a format other tools load without prune_peft.

    ``format="merged"``: merge the adapters (on a copy; ``model`` is untouched) and save a sparse safetensors
    checkpoint (+ ``tokenizer`` when given) loadable with ``AutoModelForCausalLM.from_pretrained``; quantized bases are
    written dequantized. Zeros are verified to survive the merge.
    ``format="lora"``: save the adapter as a standard LoRA adapter — refused for adapter types whose update is not a
    plain ``B·A`` (SparseLoRA, SPP): a LoRA loader would apply a dense update and silently destroy the sparsity.
    ``format="compacted"``: a structured LoRAPrune adapter, merged and physically shrunk (:func:`prune_peft.compact`)
    into a stock config — only when every block keeps the same number of GQA units and MLP channels
    (``LoRAPruneConfig(uniform=True)``); otherwise refused before any work (``prune_peft.save_compacted`` writes the
    non-uniform model, which only ``prune_peft.load_compacted`` can read).

    ``dtype``: of the saved safetensors (default: the base model's, e.g. bf16 for a bf16 base). ``base_model``
    (default: the adapter's ``base_model_name_or_path``), ``data`` (the calibration / training data, as you name it)
    and ``perplexity`` go into the model card. Returns a small summary. The output folder is written atomically.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    peft_config = _check_peft_model(model, "export")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype such as 'bfloat16', 'float16', 'float32', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if perplexity is not None and not (isinstance(perplexity, (int, float)) and perplexity > 0):
        raise ValueError(f"perplexity must be a positive number (the measured value), got {perplexity!r}")
    first = next(iter(peft_config.values()))
    base = base_model or first.base_model_name_or_path
    methods = sorted({cfg.peft_type.value.lower() for cfg in peft_config.values()})
    if format == "compacted":
        counts = _uniform_counts(model)
        if counts is None:
            raise ValueError(
                f"format='compacted' needs a structured LoRAPrune adapter (structure='head+channel', 'head' or "
                f"'channel'), got {methods}; use format='merged'"
            )
        if len(counts["units"]) > 1 or len(counts["channels"]) > 1:
            raise ValueError(
                "format='compacted' writes a stock config, which has one size for every block, but the blocks keep "
                f"{sorted(counts['units'])} KV units and {sorted(counts['channels'])} MLP channels (LoRAPrune "
                "excludes the first and last blocks unless uniform=True). Train with LoRAPruneConfig(uniform=True), "
                "or save the non-uniform model with prune_peft.save_compacted (it loads only through "
                "prune_peft.load_compacted, no serving engine reads it)."
            )
    out = check_output_dir(out, overwrite=overwrite)  # before any work (a merge copies the whole model)
    from ._dist import sharding_kind

    if sharding_kind(model) is not None:  # FSDP2: gathered and merged one module at a time, rank 0 writes
        from .tuners._fsdp import check_sharded_layout, export_merged_sharded

        if format != "merged":
            raise ValueError(f"format={format!r} is not supported on a sharded model; use format='merged'")
        check_sharded_layout(model, owner="export")
        return export_merged_sharded(
            model, out, dtype=dtype, overwrite=overwrite, tokenizer=tokenizer,
            card=lambda s: export_card(format, s, base=base, methods=methods, data=data, perplexity=perplexity),
        )  # fmt: skip
    if format == "lora":
        bad = {name: cfg.peft_type.value for name, cfg in peft_config.items() if not is_plain_lora(cfg)}
        if bad:
            raise ValueError(
                f"format='lora' needs plain LoRA adapters, but {bad} mask or rescale their update (ΔW = M ⊙ s·BA, "
                "SPP's (Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W): published as LoRA, a loader would apply a dense update and "
                "silently break the base's sparsity. Use format='merged' (a sparse checkpoint) instead."
            )
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return {"format": "lora", "path": str(out), "adapters": sorted(peft_config)}

    from .evaluation import sparsity_report
    from .tuners import SparseAdapterLayer, dense_weight, sparse_layers

    with atomic_dir(out, overwrite=overwrite) as tmp:
        work = copy.deepcopy(model)
        zeros = {
            n.removeprefix("base_model.model."): dense_weight(m.get_base_layer()) == 0
            for n, m in sparse_layers(work).items()
        }
        ours = any(isinstance(m, SparseAdapterLayer) for m in work.modules())
        kwargs = {"dtype": dtype} if ours and dtype is not None else {}
        params_before = sum(p.numel() for p in work.get_base_model().parameters())
        shapes_before = _shapes_by_type(work.get_base_model())
        merged = work.merge_and_unload(**kwargs)
        for name, module in merged.named_modules():
            if name in zeros and bool((zeros[name] & (module.weight != 0)).any()):
                raise RuntimeError(f"merge filled in zeros of {name}; nothing was written")  # never expected
        if format == "compacted":
            from .pruning.structured import compact, compacted_shapes

            compact(merged)
            if compacted_shapes(merged) is not None:  # never expected after the check above
                raise RuntimeError("compact() produced per-layer sizes; nothing was written")
        target = dtype or _dtype_of(model.get_base_model())
        if _dtype_of(merged) != target and not getattr(merged, "is_quantized", False):
            merged.to(target)
        merged.config.dtype = target
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        summary = sparsity_report(merged)
        info: dict = {"format": format, "path": str(out), "dtype": str(target).removeprefix("torch.")}
        if format == "compacted":
            after = _shapes_by_type(merged)
            summary = {
                "params_before": params_before,
                "params_after": sum(p.numel() for p in merged.parameters()),
                "removed_by_type": {k: 1 - after.get(k, 0) / v for k, v in shapes_before.items() if v},
            }
            cfg = merged.config
            info.update(
                params_before=summary["params_before"],
                params_after=summary["params_after"],
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                intermediate_size=cfg.intermediate_size,
            )
        else:
            info.update(
                sparsity=summary["sparsity"],
                by_type={k: v["sparsity"] for k, v in summary["by_type"].items()},
                modules=len(summary["modules"]),
            )
            if "2:4_valid_modules" in summary:
                info["2:4_valid_modules"] = summary["2:4_valid_modules"]
        card = export_card(format, summary, base=base, methods=methods, data=data, perplexity=perplexity)
        card.save(tmp / "README.md")
    return info


def _shapes_by_type(model: nn.Module) -> dict[str, int]:
    """Weights per module type inside the decoder blocks (``q_proj`` → total numel)."""
    from . import _hf

    prefix = _hf.find_decoder_blocks(model)[0] + "."
    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        name = name.removesuffix(".base_layer")  # a peft layer's wrapped Linear counts as its module
        if name.startswith(prefix) and isinstance(mod, nn.Linear) and ".lora_" not in name:
            key = name.rpartition(".")[2]
            out[key] = out.get(key, 0) + mod.weight.numel()
    return out


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str = "Upload prune_peft adapter",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload a ``PeftModel``'s adapters, masks and model card (with the prune_peft section) to the Hub.

    ``model.push_to_hub`` works too, but transformers replaces ``README.md`` with the repository's card after saving,
    which drops the sparsity section; this helper saves with :meth:`save_pretrained` (which writes the card) on top of
    the repository's existing card, and uploads the folder with ``huggingface_hub.HfApi.upload_folder``.
    Returns the ``CommitInfo``.

    >>> prune_peft.hub.push_to_hub(model, "me/llama-2of4-sparse-lora")
    """
    _check_peft_model(model, "push_to_hub")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a Hub repository id like 'me/my-adapter', got {repo_id!r}")
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        if api.file_exists(repo_id, "README.md", revision=revision):
            # start from the repository's card, as transformers' push_to_hub does; our section is refreshed in it
            existing = api.hf_hub_download(repo_id, "README.md", revision=revision)
            shutil.copyfile(existing, os.path.join(tmp, "README.md"))
        model.save_pretrained(tmp)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
