"""Register prune_peft adapter types with stock peft (0.17 → newest), idempotently.

peft's ``register_peft_method`` only accepts names that are already members of its closed ``PeftType`` enum, so the
member is added at runtime first (the one hack; guarded so re-imports and reloads are no-ops). Everything else goes
through peft's public registration path, which fills ``PEFT_TYPE_TO_CONFIG/TUNER/PREFIX_MAPPING``.

Also here: the few version switches the adapter layers need (layer constructor signature, state-dict selection), and
the refusal of adapter folders whose ``peft_type`` was edited to a stock type (:func:`retyped_adapter_problem`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from contextlib import contextmanager

from peft.utils import PeftType

__all__ = [
    "current_injection",
    "ensure_peft_type",
    "injecting",
    "is_retype_guard",
    "refuse_retyped_adapter",
    "register_adapter_type",
    "retype_guard",
    "retyped_adapter_problem",
    "strip_retype_guard",
    "with_retype_guard",
]


def ensure_peft_type(name: str) -> PeftType:
    """Return ``PeftType[NAME]``, adding the member to the enum when it is missing."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)
    return member


def register_adapter_type(name: str, config_cls: type, model_cls: type, prefix: str = "lora_") -> PeftType:
    """``register_peft_method`` after :func:`ensure_peft_type`; a second call (re-import, reload) is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type(name)
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is not None:
        if existing.__qualname__ != config_cls.__qualname__ or existing.__module__ != config_cls.__module__:
            raise ValueError(f"peft type {peft_type.value} is already registered by {existing.__module__}")
        # same classes (or a reloaded module): point the mappings at the current objects
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    _install_state_dict_shim()
    return peft_type


# ------------------------------------------------------------------------------------------------- injection context

_INJECTION: contextvars.ContextVar = contextvars.ContextVar("prune_peft_injection", default=None)


@contextmanager
def injecting(config, module_name: str | None):
    """Make the config and module name visible to layer constructors (peft < 0.18 does not pass the config)."""
    token = _INJECTION.set((config, module_name))
    try:
        yield
    finally:
        _INJECTION.reset(token)


def current_injection():
    """``(config, module_name)`` of the injection in progress, or ``(None, None)``."""
    return _INJECTION.get() or (None, None)


# ------------------------------------------------------------------------------------------------- version switches


@functools.cache
def layer_takes_config() -> bool:
    """peft ≥ 0.18 builds LoRA layers as ``Layer(base, adapter, config=..., r=..., lora_alpha=...)``."""
    from peft.tuners.lora import Linear

    return "config" in inspect.signature(Linear.__init__).parameters


def _our_types() -> set:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return {t for t, cls in PEFT_TYPE_TO_TUNER_MAPPING.items() if cls.__module__.startswith("prune_peft.")}


def _install_state_dict_shim() -> None:
    """On peft < 0.21 make ``get_peft_model_state_dict`` select our adapters the way it selects LoRA's.

    Before peft 0.21 (#3490) the selection is an ``if peft_type == …`` chain: unknown types fall through to "every key
    containing the prefix", which also saves the *other* adapters of a multi-adapter model and ignores ``bias``.
    For our types the LoRA branch is exactly right (our masks are ``lora_…`` buffers keyed by adapter name), so the
    call runs with the config's type temporarily reported as LORA. peft ≥ 0.21 selects structurally per tuner class
    and needs nothing.
    """
    from peft.tuners.tuners_utils import BaseTuner

    if hasattr(BaseTuner, "_get_adapter_state_dict"):
        return
    import peft
    import peft.peft_model
    import peft.utils
    import peft.utils.save_and_load as sl

    original = sl.get_peft_model_state_dict
    if getattr(original, "_prune_peft_shim", False):
        return

    @functools.wraps(original)
    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        config = model.peft_config[adapter_name]
        if config.peft_type not in _our_types():
            return original(model, state_dict, adapter_name, *args, **kwargs)
        real = config.peft_type
        config.peft_type = PeftType.LORA
        try:
            return original(model, state_dict, adapter_name, *args, **kwargs)
        finally:
            config.peft_type = real

    get_peft_model_state_dict._prune_peft_shim = True
    for module in (sl, peft, peft.utils, peft.peft_model):
        if getattr(module, "get_peft_model_state_dict", None) is original:
            module.get_peft_model_state_dict = get_peft_model_state_dict


# ------------------------------------------------------------------------------------------ retyped adapter folders

RETYPE_GUARD_PREFIX = "prune_peft:"

# tensors only prune_peft's adapter layers save (per module: ``base_model.model.<module>.<name>``)
_WEIGHT_MARKERS = {
    "lora_sparse_mask": "SPARSE_LORA or SPP",
    "lora_sparse_nnz": "SPARSE_LORA or SPP",
    "lora_prune_mask": "LORAPRUNE",
    "lora_prune_emask": "LORAPRUNE",
}


def retype_guard(peft_type) -> str:
    """The ``target_parameters`` value our sparse adapter configs write into ``adapter_config.json``.

    A hostile or careless edit of ``"peft_type"`` to ``"LORA"`` would make stock peft build a plain ``LoraConfig``
    (dropping our fields with one warning) and load the factors as plain LoRA: a dense update, and a merge that fills
    every zero of the pruned base. ``target_parameters`` is a field ``LoraConfig`` (and every config derived from it)
    knows, and it refuses a string there (``TypeError`` in ``LoraConfig.__post_init__``, peft 0.17.1 - 0.21.2; peft's
    config loader re-raises every ``TypeError`` that is not about unknown keys). Our configs turn the marker back into
    ``None`` before peft's own checks run, so the field keeps its meaning (no parameter targets) for them.
    """
    name = getattr(peft_type, "value", peft_type)
    return (
        f'{RETYPE_GUARD_PREFIX} this is a {name} adapter. Keep "peft_type": "{name}" and import prune_peft before '
        "loading; as plain LoRA its masks would be dropped and a merge would fill the zeros of the pruned base"
    )


def is_retype_guard(value) -> bool:
    """Whether ``value`` is a :func:`retype_guard` marker."""
    return isinstance(value, str) and value.startswith(RETYPE_GUARD_PREFIX)


def strip_retype_guard(config) -> None:
    """Our configs' ``__post_init__`` (before peft's checks): the marker read back means no parameter targets."""
    if is_retype_guard(getattr(config, "target_parameters", None)):
        config.target_parameters = None


def with_retype_guard(out: dict, peft_type) -> dict:
    """Our configs' ``to_dict``: the marker in place of ``target_parameters=None`` (stock LoraConfig refuses it)."""
    if "target_parameters" in out and out["target_parameters"] is None:
        out["target_parameters"] = retype_guard(peft_type)
    return out


def _config_fields(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _weight_names(folder: str) -> set[str]:
    """The last component of every tensor name in ``adapter_model.safetensors`` (header only; empty if unreadable)."""
    import os

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return set()
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return {k.rsplit(".", 1)[-1] for k in f.keys()}
    except Exception:  # a broken file is the loader's to report (it names the file)
        return set()


def retyped_adapter_problem(folder) -> str | None:
    """Why ``folder`` holds a prune_peft adapter whose ``adapter_config.json`` names another peft type (None if not).

    Evidence, any of: the :func:`retype_guard` marker in ``target_parameters``; config fields only prune_peft's
    adapter configs have (``sparse_digests``, ``structure``, ...); mask tensors only prune_peft's layers save.
    """
    import json
    import os

    from peft import LoraConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = os.path.join(os.fspath(folder), "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # no (readable) config: the loader's error names it
    if not isinstance(cfg, dict):
        return None
    declared = cfg.get("peft_type")
    ours = {t.value: c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if c.__module__.startswith("prune_peft.")}
    if declared in ours:
        return None
    stock = next((c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if t.value == declared), LoraConfig)
    evidence, origin = [], None
    guard = cfg.get("target_parameters")
    if is_retype_guard(guard):
        origin = next((name for name in ours if f" a {name} adapter" in guard), None)
        evidence.append("its target_parameters holds prune_peft's marker")
    hits = {name: sorted((_config_fields(c) - _config_fields(stock)) & cfg.keys()) for name, c in ours.items()}
    best = max(hits, key=lambda name: len(hits[name]), default=None)
    if best is not None and hits[best]:
        origin = origin or best
        evidence.append(f"it has {best} config fields {', '.join(hits[best][:4])}")
    tensors = sorted(_weight_names(os.fspath(folder)) & _WEIGHT_MARKERS.keys())
    if tensors:
        origin = origin or _WEIGHT_MARKERS[tensors[0]]
        evidence.append(f"adapter_model.safetensors holds {', '.join(tensors)} tensors")
    if not evidence:
        return None
    return (
        f'adapter folder {os.fspath(folder)}: adapter_config.json says "peft_type": {declared!r}, but prune_peft wrote '
        f"it as a {origin} adapter ({'; '.join(evidence)}). Loaded as {declared} its masks would be dropped (a dense "
        "update; a merge fills every zero of the pruned base). "
        + (f'Restore "peft_type": "{origin}"' if " " not in origin else f'Restore its "peft_type" ({origin})')
        + " in adapter_config.json"
    )


def refuse_retyped_adapter(folder) -> None:
    """ValueError (:func:`retyped_adapter_problem`) for a prune_peft adapter folder whose peft type was edited."""
    problem = retyped_adapter_problem(folder)
    if problem:
        raise ValueError(problem)
