"""Physically remove pruned attention units and MLP channels; save and reload the smaller model.

``compact(model)`` slices, per decoder block, the rows of q/k/v (whole GQA units: one KV head with its query heads),
the matching input columns of o_proj, the rows of gate/up and the columns of down_proj — in the base weights and,
for an unmerged LoRAPrune ``PeftModel``, in the LoRA factors and masks too. The query-per-KV ratio is unchanged, so
transformers' attention (which reshapes with ``-1`` heads) runs each block with its own head count, and the outputs
equal the masked model's.

Which groups go, in order of preference: the ``masks`` argument; the masks a LoRAPrune ``merge_and_unload()`` left on
the model (``model.prune_peft_masks``); the masks of an unmerged LoRAPrune adapter; otherwise groups whose weights
(and biases) are exactly zero in every one of their rows (q, k and v for a unit; gate and up for a channel).

Where the sizes go decides who can load the result:

* **uniform** (every block keeps the same number of GQA units and MLP channels — ``LoRAPruneConfig(uniform=True)``):
  the stock config fields ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` are rewritten
  (``head_dim`` kept explicit), so plain ``AutoModelForCausalLM.from_pretrained`` — and every engine that reads a
  transformers checkpoint (vLLM, TGI, llama.cpp's converter) — loads it without prune_peft.
* **non-uniform** (blocks of different sizes, e.g. LoRAPrune's default excluded blocks kept whole): stock configs have
  one size for all blocks, so the per-layer sizes go into ``config.prune_peft_layers`` and only
  :func:`load_compacted` (prune_peft) can build the model; stock ``from_pretrained`` would build full-size layers and
  refuse the smaller weights, and no serving engine loads it.

::

    small = compact(model.merge_and_unload())
    save_compacted(small, "out/")
    small = load_compacted("out/")   # uniform: AutoModelForCausalLM.from_pretrained("out/") works as well
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import _hf
from ..tuners.loraprune import LoRAPruneLayer, LoRAPruneModel

__all__ = ["compact", "compacted_shapes", "is_uniform", "load_compacted", "save_compacted"]

LAYERS_KEY = "prune_peft_layers"


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _masks_from_zeros(block: nn.Module, head_dim: int) -> dict[str, torch.Tensor]:
    out = {}
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None and all(hasattr(attn, r) for r in ("q_proj", "k_proj", "v_proj", "o_proj")):
        q, k, v = (_base_linear(getattr(attn, r)) for r in ("q_proj", "k_proj", "v_proj"))
        n_kv = k.out_features // head_dim
        alive = []
        for lin in (q, k, v):
            rows = lin.weight.detach().ne(0).any(1)
            if lin.bias is not None:
                rows = rows | lin.bias.detach().ne(0)
            alive.append(rows.reshape(n_kv, -1).any(1))
        units = alive[0] | alive[1] | alive[2]
        if not bool(units.all()):
            out["units"] = units.cpu()
    if mlp is not None and all(hasattr(mlp, r) for r in ("gate_proj", "up_proj", "down_proj")):
        gate, up = _base_linear(mlp.gate_proj), _base_linear(mlp.up_proj)
        channels = gate.weight.detach().ne(0).any(1) | up.weight.detach().ne(0).any(1)
        for lin in (gate, up):
            if lin.bias is not None:
                channels = channels | lin.bias.detach().ne(0)
        if not bool(channels.all()):
            out["channels"] = channels.cpu()
    return out


ATTN_ROLES, MLP_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _quantization(module: nn.Module) -> str | None:
    """What quantizes ``module``'s base weight (``"bitsandbytes 4-bit nf4"``, ...), or None for a float Linear."""
    base = _base_linear(module)
    weight = getattr(base, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":  # checked by name: bitsandbytes may not be installed, and is never imported here
        return f"bitsandbytes 4-bit {getattr(weight, 'quant_type', None) or 'nf4/fp4'}"
    if kind == "Int8Params":
        return "bitsandbytes 8-bit LLM.int8"
    if type(base).__module__.split(".")[0] == "bitsandbytes":
        return f"bitsandbytes {type(base).__name__}"
    if not isinstance(base, nn.Linear) or weight is None:
        return f"{type(base).__module__}.{type(base).__name__} (not a torch.nn.Linear)"
    if not weight.is_floating_point():
        return f"{weight.dtype} weight"
    return None


def _refuse_quantized(hf: nn.Module, blocks: nn.ModuleList, prefix: str) -> None:
    """compact slices weights row/column-wise: packed quantized storage would be cut into garbage. Refused up front,
    for every projection compact may touch, adapted or not (a LoRAPrune bnb layer's own refusal comes too late for
    an untargeted bnb sibling)."""
    found: dict[str, str] = {}
    for i, block in enumerate(blocks):
        for group, roles in (("self_attn", ATTN_ROLES), ("mlp", MLP_ROLES)):
            parent = getattr(block, group, None)
            for role in roles:
                module = getattr(parent, role, None) if parent is not None else None
                kind = _quantization(module) if module is not None else None
                if kind is not None:
                    found[f"{prefix}.{i}.{group}.{role}".lstrip(".")] = kind
    if not found:
        return
    names = list(found)  # block order, then projection order
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    kinds = ", ".join(sorted(set(found.values())))
    qc = getattr(getattr(hf, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum -> its string
    raise ValueError(
        f"compact: {shown} {'is' if len(names) == 1 else 'are'} quantized ({kinds}"
        f"{f'; quant_method={method!r}' if method is not None else ''}): quantized weights cannot be sliced (packed "
        "storage). Dequantize first: an adapted model's merge_and_unload() returns de-quantized nn.Linear layers "
        "(prune_peft adapters; target every projection), or reload the model without quantization_config, then compact"
    )


def _slice_param(p: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, index.to(p.device)).clone(), requires_grad=p.requires_grad)


def _slice(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep ``rows`` (output features) / ``cols`` (input features) of a Linear or a peft LoRA layer, in place."""
    if isinstance(module, LoRAPruneLayer):
        module.compact_masks(rows, cols)  # first: refuses element-wise masks before anything is sliced
    base = _base_linear(module)
    if rows is not None:
        base.weight = _slice_param(base.weight, 0, rows)
        if base.bias is not None:
            base.bias = _slice_param(base.bias, 0, rows)
        base.out_features = len(rows)
    if cols is not None:
        base.weight = _slice_param(base.weight, 1, cols)
        base.in_features = len(cols)
    if base is module:
        return
    # a peft LoRA layer: B's rows follow the outputs, A's columns the inputs; masks follow the rows
    for adapter in list(getattr(module, "lora_A", {})):
        if rows is not None:
            module.lora_B[adapter].weight = _slice_param(module.lora_B[adapter].weight, 0, rows)
            module.lora_B[adapter].out_features = len(rows)
        if cols is not None:
            module.lora_A[adapter].weight = _slice_param(module.lora_A[adapter].weight, 1, cols)
            module.lora_A[adapter].in_features = len(cols)
    module.out_features, module.in_features = base.out_features, base.in_features


def _collect_masks(model: nn.Module, masks) -> dict[int, dict[str, torch.Tensor]] | None:
    if masks is not None:
        return {int(k): v for k, v in masks.items()}
    hf = _hf.base_model(model)
    stored = getattr(hf, "prune_peft_masks", None)
    if stored is not None:
        return stored
    tuner = next((m for m in model.modules() if isinstance(m, LoRAPruneModel)), None)
    if tuner is not None:
        adapter = tuner.active_adapters[0]
        if tuner.peft_config[adapter].structured:
            return tuner.get_masks(adapter)
    return None


@torch.no_grad()
def compact(model: nn.Module, masks: dict[int, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Remove pruned GQA units and MLP channels from ``model`` in place and return it.

    ``masks``: ``{block index: {"units": bool[num_kv_heads], "channels": bool[intermediate]}}`` (True = kept);
    default: see the module docstring. Works on a merged/plain transformers model and on an unmerged LoRAPrune
    ``PeftModel`` (LoRA factors and masks are sliced too). Records per-layer sizes in ``config.prune_peft_layers``.
    Quantized projections (bitsandbytes, or any non-float / non-``nn.Linear`` base) are refused with a ValueError
    before anything changes: dequantize first (``merge_and_unload()``).
    """
    hf = _hf.base_model(model)
    config = _hf.text_config(hf)
    head_dim = _hf.head_dim(config)
    prefix, blocks = _hf.find_decoder_blocks(hf)
    _refuse_quantized(hf, blocks, prefix)  # before anything is read or changed
    chosen = _collect_masks(model, masks)
    layers = compacted_shapes(hf) or {
        "num_attention_heads": [config.num_attention_heads] * len(blocks),
        "num_key_value_heads": [getattr(config, "num_key_value_heads", None) or config.num_attention_heads]
        * len(blocks),
        "intermediate_size": [config.intermediate_size] * len(blocks),
    }
    for i, block in enumerate(blocks):
        m = chosen.get(i, {}) if chosen is not None else _masks_from_zeros(block, head_dim)
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        units = m.get("units")
        if units is not None and not bool(torch.as_tensor(units).all()):
            units = torch.as_tensor(units, dtype=torch.bool).cpu()
            if not bool(units.any()):
                raise ValueError(f"compact: the masks remove every attention head of block {i}")
            k = _base_linear(attn.k_proj)
            n_kv = k.out_features // head_dim
            if units.numel() != n_kv:
                raise ValueError(f"compact: block {i} has {n_kv} KV heads, the unit mask has {units.numel()}")
            q_per_unit = _base_linear(attn.q_proj).out_features // n_kv
            keep_units = units.nonzero().flatten()
            q_rows = (keep_units[:, None] * q_per_unit + torch.arange(q_per_unit)).flatten()
            kv_rows = (keep_units[:, None] * head_dim + torch.arange(head_dim)).flatten()
            _slice(attn.q_proj, rows=q_rows)
            _slice(attn.k_proj, rows=kv_rows)
            _slice(attn.v_proj, rows=kv_rows)
            _slice(attn.o_proj, cols=q_rows)
            n_heads = len(q_rows) // head_dim
            layers["num_attention_heads"][i] = n_heads
            layers["num_key_value_heads"][i] = len(keep_units)
            for attr, value in (("num_heads", n_heads), ("num_key_value_heads", len(keep_units))):
                if hasattr(attn, attr):
                    setattr(attn, attr, value)
        channels = m.get("channels")
        if channels is not None and not bool(torch.as_tensor(channels).all()):
            channels = torch.as_tensor(channels, dtype=torch.bool).cpu()
            if not bool(channels.any()):
                raise ValueError(f"compact: the masks remove every MLP channel of block {i}")
            keep = channels.nonzero().flatten()
            _slice(mlp.gate_proj, rows=keep)
            _slice(mlp.up_proj, rows=keep)
            _slice(mlp.down_proj, cols=keep)
            layers["intermediate_size"][i] = len(keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(keep)
    if getattr(config, "head_dim", None) is None:
        config.head_dim = head_dim
    _write_sizes(config, layers)
    _refresh_tuners(model)
    for attr in ("prune_peft_masks", "prune_peft_meta"):
        if hasattr(hf, attr):
            delattr(hf, attr)
    return model


def is_uniform(layers: dict) -> bool:
    """True when every block has the same head counts and intermediate size (a stock config can describe it)."""
    return all(len(set(values)) == 1 for values in layers.values())


def _write_sizes(config, layers: dict) -> None:
    """Uniform sizes: the stock fields (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``;
    ``head_dim`` stays explicit since it no longer equals hidden/heads). Otherwise ``config.prune_peft_layers``."""
    if is_uniform(layers):
        config.num_attention_heads = layers["num_attention_heads"][0]
        config.num_key_value_heads = layers["num_key_value_heads"][0]
        config.intermediate_size = layers["intermediate_size"][0]
        if hasattr(config, LAYERS_KEY):
            delattr(config, LAYERS_KEY)
    else:
        setattr(config, LAYERS_KEY, layers)


def _refresh_tuners(model: nn.Module) -> None:
    """An unmerged LoRAPrune model: re-read the (now smaller) blocks; every remaining group is kept."""
    for tuner in [m for m in model.modules() if isinstance(m, LoRAPruneModel)]:
        tuner.refresh_blocks()


def compacted_shapes(model_or_config) -> dict | None:
    """``config.prune_peft_layers`` (per-layer head counts and intermediate sizes) or None."""
    config = _hf.text_config(model_or_config)
    layers = getattr(config, LAYERS_KEY, None)
    return {k: list(v) for k, v in layers.items()} if layers else None


def _reshape_empty(model: nn.Module, layers: dict) -> None:
    """Give a freshly built full-size model the per-layer shapes of a compacted one (weights to be loaded)."""
    config = _hf.text_config(model)
    head_dim = _hf.head_dim(config)
    _, blocks = _hf.find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        attn, mlp = block.self_attn, block.mlp
        n_heads, n_kv = layers["num_attention_heads"][i], layers["num_key_value_heads"][i]
        if n_heads != config.num_attention_heads or n_kv != getattr(config, "num_key_value_heads", n_kv):
            _slice(attn.q_proj, rows=torch.arange(n_heads * head_dim))
            _slice(attn.k_proj, rows=torch.arange(n_kv * head_dim))
            _slice(attn.v_proj, rows=torch.arange(n_kv * head_dim))
            _slice(attn.o_proj, cols=torch.arange(n_heads * head_dim))
            for attr, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
                if hasattr(attn, attr):
                    setattr(attn, attr, value)
        size = layers["intermediate_size"][i]
        if size != config.intermediate_size:
            _slice(mlp.gate_proj, rows=torch.arange(size))
            _slice(mlp.up_proj, rows=torch.arange(size))
            _slice(mlp.down_proj, cols=torch.arange(size))
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = size


def save_compacted(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, **kwargs) -> None:
    """``model.save_pretrained(path)``, atomically. A uniform compaction has a stock config (any ``from_pretrained``
    loads it); a non-uniform one carries ``prune_peft_layers`` and loads only through :func:`load_compacted`.

    The folder is built aside and swapped in (:func:`prune_peft._io.atomic_dir`): ``path`` is at every moment the
    complete old output or the complete new one. A non-empty ``path`` is refused unless ``overwrite=True``.
    """
    from .._io import atomic_dir

    with atomic_dir(path, overwrite=overwrite, name="path") as tmp:
        model.save_pretrained(tmp, **kwargs)


def load_compacted(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_compacted`: full-size skeleton → per-layer shapes → the saved weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    layers = compacted_shapes(config)
    if layers is None:  # uniform compaction (or a plain model): the stock loader builds the right shapes
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        return (model.to(device) if device is not None else model).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    _reshape_empty(model, layers)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not (config.tie_word_embeddings and "lm_head" in k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"load_compacted: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()
