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
    "is_plain_lora",
    "merged_card",
    "push_to_hub",
    "stock_reload",
    "write_adapter_card",
]

FORMATS = ("merged", "lora")


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


def card_section(config) -> str | None:
    """The model-card text describing a prune_peft adapter (None when no summary is known).

    The summary (``config._pp_card``: method, pattern, sparsity, counts) is filled by the tuner when it injects.
    """
    card = getattr(config, "_pp_card", None)
    if not card:
        return None
    base = config.base_model_name_or_path or "<base model>"
    name = _METHOD_NAMES.get(card["method"], card["method"])
    return (
        "## Sparsity-preserving adapter (prune_peft)\n\n"
        f"- method: {name} (`{config.peft_type.value}`)\n"
        f"- base model: `{base}`\n"
        f"- sparsity pattern: {card['pattern']}\n"
        f"- sparsity ratio of the adapted weights: {card['sparsity']:.4f} "
        f"({card['modules']} modules, {card['weights']} weights)\n"
        "- merging (`merge_and_unload`) keeps every zero of the pruned base; the masks travel in "
        "`adapter_model.safetensors` (`lora_sparse_mask`, bit-packed).\n\n"
        "Load it (the adapter type is registered by `import prune_peft`):\n\n"
        "```python\n"
        "import prune_peft  # registers the adapter type with peft\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")  # the same pruned base\n'
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")\n'
        "merged = model.merge_and_unload()  # sparse, same zeros as the base\n"
        "```\n"
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
    summary = config._pp_card
    tags = set(card.data.tags or []) | {"prune_peft", "sparse", summary["method"].replace("_", "-"), "peft"}
    if summary["pattern"] != "unstructured":
        tags.add(f"sparsity-{summary['pattern'].replace(':', 'of')}")
    card.data.tags = sorted(tags)
    card.data.library_name = card.data.library_name or "peft"
    if config.base_model_name_or_path and not card.data.base_model:
        card.data.base_model = config.base_model_name_or_path
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
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")',
        "```",
        "",
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
    """
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        ids_path = logits_path = ""
        if input_ids is not None:
            ids_path, logits_path = os.path.join(tmp, "ids.pt"), os.path.join(tmp, "logits.pt")
            torch.save(input_ids.detach().cpu(), ids_path)
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.run(
            [sys.executable, "-c", _STOCK_LOAD, str(path), ids_path, logits_path],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"stock from_pretrained({str(path)!r}) failed in a fresh process:\n{tail}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result.pop("prune_peft_imported"):
            raise RuntimeError(f"loading {str(path)!r} imported prune_peft: the checkpoint is not stock")
        result["logits"] = torch.load(logits_path) if logits_path else None
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


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "merged",
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``model`` (a ``PeftModel``) to ``out`` in a format other tools load without prune_peft.

    ``format="merged"``: merge the adapters (on a copy; ``model`` is untouched) and save a sparse safetensors
    checkpoint (+ ``tokenizer`` when given) loadable with ``AutoModelForCausalLM.from_pretrained``; quantized bases are
    written dequantized (``dtype``, default the compute dtype). Zeros are verified to survive the merge.
    ``format="lora"``: save the adapter as a standard LoRA adapter — refused for adapter types whose update is not a
    plain ``B·A`` (SparseLoRA, SPP): a LoRA loader would apply a dense update and silently destroy the sparsity.

    Returns a small summary (format, path, sparsity for merged exports). The output folder is written atomically.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    peft_config = _check_peft_model(model, "export")
    out = check_output_dir(out, overwrite=overwrite)  # before any work (a merge copies the whole model)
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

    methods = sorted({cfg.peft_type.value.lower() for cfg in peft_config.values()})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        work = copy.deepcopy(model)
        zeros = {
            n.removeprefix("base_model.model."): dense_weight(m.get_base_layer()) == 0
            for n, m in sparse_layers(work).items()
        }
        ours = any(isinstance(m, SparseAdapterLayer) for m in work.modules())
        kwargs = {"dtype": dtype} if ours and dtype is not None else {}
        merged = work.merge_and_unload(**kwargs)
        for name, module in merged.named_modules():
            if name in zeros and bool((zeros[name] & (module.weight != 0)).any()):
                raise RuntimeError(f"merge filled in zeros of {name}; nothing was written")  # never expected
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        summary = sparsity_report(merged)
        base = next(iter(peft_config.values())).base_model_name_or_path
        merged_card(summary, base, methods).save(tmp / "README.md")
    return {
        "format": "merged",
        "path": str(out),
        "sparsity": summary["sparsity"],
        "2:4_valid_modules": summary.get("2:4_valid_modules"),
        "modules": len(summary["modules"]),
    }


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
