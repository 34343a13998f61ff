"""Introspection of transformers models and configs: the one home for "which config, which blocks, which head size".

A leaf module: it imports only torch, so every layer of the package (pruning, tuners, callbacks, distill) may use it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["base_model", "decoder_blocks", "find_decoder_blocks", "head_dim", "text_config"]


def text_config(model_or_config: Any) -> Any:
    """The text (decoder) config of a model or config; multimodal configs hold it under ``get_text_config()``.

    >>> text_config(model).num_hidden_layers  # same for model.config
    """
    config = getattr(model_or_config, "config", None) if isinstance(model_or_config, nn.Module) else model_or_config
    if config is None:
        raise ValueError(f"model_or_config={type(model_or_config).__name__} has no .config; pass a model or config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config: Any) -> int:
    """Attention head size: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    config = text_config(config)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or the model itself)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` holding the decoder blocks (length = ``num_hidden_layers``)."""
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == n_layers:
            return name, module
    raise ValueError(
        f"{type(model).__name__} has no recognizable decoder blocks: expected an nn.ModuleList of "
        f"config.num_hidden_layers={n_layers} blocks (Llama/Qwen2/Mistral-style `model.layers`)"
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (see :func:`find_decoder_blocks` for its module name too)."""
    return find_decoder_blocks(model)[1]
