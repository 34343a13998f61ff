"""Register prune_peft adapter types with stock peft (0.17 → newest), idempotently.

peft's ``register_peft_method`` only accepts names that are already members of its closed ``PeftType`` enum, so the
member is added at runtime first (the one hack; guarded so re-imports and reloads are no-ops). Everything else goes
through peft's public registration path, which fills ``PEFT_TYPE_TO_CONFIG/TUNER/PREFIX_MAPPING``.

Also here: the few version switches the adapter layers need (layer constructor signature, state-dict selection).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from contextlib import contextmanager

from peft.utils import PeftType

__all__ = ["current_injection", "ensure_peft_type", "injecting", "register_adapter_type"]


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
