"""Sharing sparse adapters: model cards, Hub pushes, and exports any transformers/peft user can load.

* ``model.save_pretrained(dir)`` on a SparseLoRA/SPP model writes the adapter weights *and* masks
  (``lora_sparse_mask``, bit-packed) plus a model card with base model, sparsity pattern and ratio, method, and the
  ``import prune_peft`` load snippet (see ``tuners/_base.py::write_card``).
* ``model.push_to_hub(repo)``: transformers' ``PushToHubMixin`` replaces ``README.md`` with the card found on the Hub
  (or a generic template) after ``save_pretrained``. For prune_peft adapters the sparsity section is written back just
  before the upload (:func:`install_push_to_hub_card`, a wrapper on ``PeftModel._upload_modified_files`` that only acts
  on models with prune_peft adapters).
* :func:`export`: ``format="merged"`` — a plain, sparse transformers checkpoint (the adapters merged with every zero
  kept); ``format="lora"`` — a standard LoRA adapter, only when the adapter really is plain LoRA.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["FORMATS", "export", "install_push_to_hub_card", "is_plain_lora"]

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


def _atomic_dir(out: Path, overwrite: bool):
    """A temp sibling of ``out`` to fill; ``_commit`` renames it into place (complete or absent, never half)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _merged_card(summary: dict, base: str | None, methods: list[str]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- prune_peft",
        "- sparse",
        *(f"- {m.replace('_', '-')}" for m in methods),
        "---",
        "",
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
    return "\n".join(lines)


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
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        raise ValueError("export expects a PeftModel (the result of get_peft_model / PeftModel.from_pretrained)")
    out = Path(out)
    if format == "lora":
        bad = {name: cfg.peft_type.value for name, cfg in peft_config.items() if not is_plain_lora(cfg)}
        if bad:
            raise ValueError(
                f"format='lora' needs plain LoRA adapters, but {bad} mask or rescale their update (ΔW = M ⊙ s·BA, "
                "SPP's (Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W): published as LoRA, a loader would apply a dense update and "
                "silently break the base's sparsity. Use format='merged' (a sparse checkpoint) instead."
            )
        tmp = _atomic_dir(out, overwrite)
        try:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _commit(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"format": "lora", "path": str(out), "adapters": sorted(peft_config)}

    from .evaluation import sparsity_report

    methods = sorted({cfg.peft_type.value.lower() for cfg in peft_config.values()})
    tmp = _atomic_dir(out, overwrite)
    try:
        work = copy.deepcopy(model)
        from .tuners import SparseAdapterLayer, dense_weight, sparse_layers

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
        (tmp / "README.md").write_text(_merged_card(summary, base, methods))
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "format": "merged",
        "path": str(out),
        "sparsity": summary["sparsity"],
        "2:4_valid_modules": summary.get("2:4_valid_modules"),
        "modules": len(summary["modules"]),
    }


def install_push_to_hub_card() -> None:
    """Keep the prune_peft card section when ``PeftModel.push_to_hub`` uploads (idempotent).

    transformers' ``push_to_hub`` saves the model, then overwrites ``README.md`` with the Hub's card, then calls
    ``self._upload_modified_files(folder, ...)``. The wrapper rewrites our section into the README files of the
    folder right before that upload, for models carrying prune_peft adapters only.
    """
    from peft import PeftModel

    from .tuners._base import write_card

    current = PeftModel.__dict__.get("_upload_modified_files")
    if current is not None and getattr(current, "_prune_peft", False):
        return
    original = PeftModel._upload_modified_files  # inherited from transformers' PushToHubMixin

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        for name, config in getattr(self, "peft_config", {}).items():
            if getattr(config, "_pp_card", None):
                folder = working_dir if name == "default" else os.path.join(working_dir, name)
                if os.path.isdir(folder):
                    write_card(folder, config)
        return original(self, working_dir, *args, **kwargs)

    _upload_modified_files._prune_peft = True
    PeftModel._upload_modified_files = _upload_modified_files
