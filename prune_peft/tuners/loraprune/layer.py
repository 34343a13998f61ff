"""LoRAPrune layers: peft's LoRA ``Linear`` plus a structured (row) or element-wise prune mask per adapter.

Row masks (q/k/v for attention units, gate/up for MLP channels) multiply the layer output, base and LoRA branch
alike; element-wise masks multiply ``W`` and ``s·BA`` inside the product. A mask with no zero costs nothing in the
forward pass. Masks are persistent ``lora_…`` buffers, so they are saved in ``adapter_model.safetensors`` and restored
by ``PeftModel.from_pretrained`` and by Trainer checkpoint resume. Merging bakes the mask into the weight (pruned rows
and their bias become zero), which is why a merge of a pruned adapter cannot be undone.

The mask logic lives in :class:`LoRAPruneLayer`, mixed in before a peft LoRA layer class: :class:`LoRAPruneLinear`
(float ``nn.Linear``) here, ``LoRAPruneLinear4bit`` / ``LoRAPruneLinear8bitLt`` (bitsandbytes bases) in
:mod:`prune_peft.tuners.loraprune.bnb`, which is imported only when bitsandbytes is installed. peft dispatches a base
layer to its class through the config's custom-module mapping (:func:`layer_mapping_loraprune`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ... import _dist
from ...sparsity.adapters import compute_dtype
from .._base import layer_mapping
from .._buffers import AdapterBuffers, PackedMasks
from .._registry import layer_takes_config

__all__ = ["LoRAPruneLayer", "LoRAPruneLinear", "layer_mapping_loraprune"]


class LoRAPruneLayer:
    """Mixin placed *before* a peft LoRA layer class: the LoRAPrune masks (``lora_prune_mask``: rows,
    ``lora_prune_emask``: elements), the masked forward and the masked merge. ``isinstance(m, LoRAPruneLayer)`` finds
    every LoRAPrune layer, whatever its base."""

    quantized: bool = False  # bitsandbytes base (LoRAPruneLinear4bit / LoRAPruneLinear8bitLt)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        self._pp_check_base(base)
        if layer_takes_config():
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        else:
            super().__init__(base_layer, adapter_name, **kwargs)

    @staticmethod
    def _pp_check_base(base: nn.Module) -> None:
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and _dist.is_sharded(weight):  # FSDP2 shard: its local rows are checked
            weight = weight.to_local()
        if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter):
            raise ValueError(
                f"loraprune: cannot adapt {type(base).__name__} with weight type {type(weight).__name__}: "
                "supported bases are torch.nn.Linear with float weights and bitsandbytes Linear4bit / Linear8bitLt"
            )

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a float tensor, for the importance: the parameter itself on a float base; on a
        bitsandbytes base a transient de-quantized copy (dropped by the caller after use, never stored)."""
        return self.get_base_layer().weight

    # ------------------------------------------------------------------------------------------------- masks

    def init_prune_mask(self, adapter: str, kind: str) -> None:
        """Create an all-kept mask: ``kind="rows"`` (bool [d_out]) or ``"elements"`` (bit-packed [d_out, d_in])."""
        device = self.get_base_layer().weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        if kind == "rows":
            if not hasattr(self, "lora_prune_mask"):
                self.lora_prune_mask = AdapterBuffers()
            self.lora_prune_mask.set(adapter, torch.ones(self.out_features, dtype=torch.bool, device=device))
        elif kind == "elements":
            if not hasattr(self, "lora_prune_emask"):
                self.lora_prune_emask = PackedMasks()
            self.lora_prune_emask.set(adapter, torch.ones(self.out_features, self.in_features, dtype=torch.bool))
            self.lora_prune_emask.to(device)
        else:
            raise ValueError(f"kind must be 'rows' or 'elements', got {kind!r}")
        self._pp_forget(adapter)

    def _pp_forget(self, adapter: str | None = None) -> None:
        cache = self.__dict__.setdefault("_pp_cache", {})
        if adapter is None:
            cache.clear()
        else:
            cache.pop(adapter, None)

    def row_mask(self, adapter: str = "default") -> torch.Tensor | None:
        store = getattr(self, "lora_prune_mask", None)
        return store.get(adapter) if store is not None and adapter in store else None

    def element_mask(self, adapter: str = "default") -> torch.Tensor | None:
        store = getattr(self, "lora_prune_emask", None)
        return store.get(adapter) if store is not None and adapter in store else None

    def set_row_mask(self, adapter: str, mask: torch.Tensor) -> None:
        current = self.row_mask(adapter)
        if current is None or tuple(mask.shape) != tuple(current.shape):
            raise ValueError(f"row mask must have shape {(self.out_features,)} for an existing adapter {adapter!r}")
        current.copy_(mask.to(device=current.device, dtype=torch.bool))
        self._pp_forget(adapter)

    def set_element_mask(self, adapter: str, mask: torch.Tensor) -> None:
        store = getattr(self, "lora_prune_emask", None)
        if store is None or adapter not in store or tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"element mask must have shape {(self.out_features, self.in_features)}")
        device = store.packed(adapter).device
        store.set(adapter, mask.to(device=device, dtype=torch.bool))
        self._pp_forget(adapter)

    def compact_masks(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        """Follow a compaction that keeps output ``rows`` / input ``cols`` of this layer (``prune_peft.compact``).

        Row masks keep the entries of the surviving rows; element-wise masks cannot be compacted (ValueError,
        raised before anything changes). Cached mask state is dropped either way.
        """
        if getattr(self, "lora_prune_emask", None) is not None and (rows is not None or cols is not None):
            raise ValueError("compact: element-wise (unstructured / N:M) LoRAPrune masks cannot be compacted")
        store = getattr(self, "lora_prune_mask", None)
        if store is not None and rows is not None:
            for adapter in store.keys():
                mask = store.get(adapter)
                store.set(adapter, mask.index_select(0, rows.to(mask.device)).clone())
        self._pp_forget()

    def _pp_state(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(row mask or None, element mask or None), None where the mask keeps everything (quantized layers: the
        element mask as its bit-packed buffer).

        Whether a mask prunes anything is cached until the mask changes (no device sync per forward); the tensors are
        read from the buffers each time, so they follow ``model.to(device)``. The unpacked element mask is cached
        per packed buffer.
        """
        cache = self.__dict__.setdefault("_pp_cache", {})
        if adapter not in cache:
            rows, elems = self.row_mask(adapter), self.element_mask(adapter)
            cache[adapter] = {
                "rows": rows is not None and not bool(rows.all()),
                "elems": elems is not None and not bool(elems.all()),
            }
        entry = cache[adapter]
        rows = self.lora_prune_mask.get(adapter) if entry["rows"] else None
        elems = None
        if entry["elems"]:
            if self.quantized:  # the packed buffer: the quantized product unpacks it per use (a cached bool mask
                return rows, self.lora_prune_emask.packed(adapter)  # would outweigh the 4-bit weight twice)
            packed = self.lora_prune_emask.packed(adapter)
            key = (packed.data_ptr(), packed.device)
            if entry.get("key") != key:
                entry["key"], entry["unpacked"] = key, self.lora_prune_emask.get(adapter)
            elems = entry["unpacked"]
        return rows, elems

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pp_forget()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for attr in ("lora_prune_mask", "lora_prune_emask"):
            store = getattr(self, attr, None)
            if store is not None:
                store.pop(adapter_name)
        self._pp_forget(adapter_name)

    # --------------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)  # merged: the mask is baked into the weight
        active = [a for a in self.active_adapters if a in self.lora_A]
        masked = [(a, *self._pp_state(a)) for a in active]
        masked = [m for m in masked if m[1] is not None or m[2] is not None]
        if not masked:
            return super().forward(x, *args, **kwargs)
        if any(m[2] is not None for m in masked):
            if len(active) != 1 or args or any(v is not None for v in kwargs.values()):
                raise ValueError("loraprune: element-wise masks support one active adapter and no extra arguments")
            return self._pp_elementwise(x, active[0], masked[0][2], masked[0][1])
        result = super().forward(x, *args, **kwargs)
        for _, rows, _ in masked:
            result = result * rows
        return result

    def _pp_masked_base(self, x: torch.Tensor, emask: torch.Tensor) -> torch.Tensor:
        """x (M ⊙ W)ᵀ + b (the base layer's product with the element mask applied to its weight)."""
        base = self.get_base_layer()
        return F.linear(x.to(base.weight.dtype), base.weight * emask, base.bias)

    def _pp_elementwise(self, x, adapter, emask, rows) -> torch.Tensor:
        """y = x (M ⊙ W)ᵀ + b + dropout(x) (M ⊙ s·BA)ᵀ — exact for the masked merge."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        out = self._pp_masked_base(x, emask)
        delta = (B @ A).mul(emask).mul_(self.scaling[adapter])  # formed in the adapter dtype
        # the branch GEMM runs in the compute dtype (autocast's, else the input's): ΔW is rounded only relative to
        # itself and added to the base *output*, never to a half-precision weight
        cd = compute_dtype(x)
        xd = self.lora_dropout[adapter](x).to(cd)
        out = out + F.linear(xd, delta.to(cd)).to(out.dtype)
        return out * rows if rows is not None else out

    # --------------------------------------------------------------------------------------------------- merging

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W ← mask ⊙ (W + s·BA); pruned rows also lose their bias. Irreversible once anything is pruned."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            weight = base.weight
            merged = weight.data.float() + self.get_delta_weight(adapter).float()
            rows, elems = self.row_mask(adapter), self.element_mask(adapter)
            if elems is not None:
                merged = merged * elems.to(merged.device)
            if rows is not None:
                merged = merged * rows.to(merged.device)[:, None]
                if base.bias is not None:
                    base.bias.data = base.bias.data * rows.to(base.bias.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.data = merged.to(weight.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        for adapter in self.merged_adapters:
            rows, elems = self._pp_state(adapter)
            if rows is not None or elems is not None:
                raise ValueError(
                    f"loraprune: adapter {adapter!r} is merged with pruned weights; the pruned rows/weights are "
                    "gone from the base and a merge of a pruned adapter cannot be undone (reload the base instead)"
                )
        super().unmerge()

    def __repr__(self) -> str:
        return "loraprune." + super().__repr__().removeprefix("lora.")


class LoRAPruneLinear(LoRAPruneLayer, LoraLinear):
    """LoRA on a float ``nn.Linear`` with a LoRAPrune mask (``lora_prune_mask``: rows, ``lora_prune_emask``: elements)."""


def _bnb_4bit() -> type:
    from .bnb import LoRAPruneLinear4bit  # bitsandbytes is imported only here, when it is installed

    return LoRAPruneLinear4bit


def _bnb_8bit() -> type:
    from .bnb import LoRAPruneLinear8bitLt

    return LoRAPruneLinear8bitLt


def layer_mapping_loraprune() -> dict:
    """peft's custom-module dispatch (``_register_custom_module``): float and bitsandbytes bases."""
    return layer_mapping(LoRAPruneLinear, _bnb_4bit, _bnb_8bit)
