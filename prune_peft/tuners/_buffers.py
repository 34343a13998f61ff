"""Per-adapter buffer containers of the sparse adapter layers: compact, checkpoint-friendly boolean masks.

Masks travel with the adapter: they are persistent buffers of a child module whose attribute name starts with the
tuner prefix (``lora_…``), so peft's state-dict selection puts them into ``adapter_model.safetensors`` on every peft
version. They are bit-packed along the last dimension by :mod:`prune_peft.sparsity.packing` (8 weights per byte,
1/32 of an fp32 weight), which keeps a 2:4 mask of a 7B model near 0.8 GB → 100 MB.

:class:`PackedMasks` is deliberately generic (any 2-D boolean mask keyed by adapter name) so other adapter types —
e.g. LoRAPrune's structured masks — can reuse it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sparsity.packing import pack_mask, unpack_mask

__all__ = ["AdapterBuffers", "PackedMasks"]


class AdapterBuffers(nn.Module):
    """Persistent buffers keyed by adapter name (a minimal, dtype-preserving ``BufferDict``).

    peft's own ``BufferDict`` is avoided on purpose: listed in a layer's ``other_param_names`` it gets cast to the base
    layer's float dtype by some peft versions, which would corrupt integer data.
    """

    def set(self, adapter: str, value: torch.Tensor) -> None:
        self.register_buffer(adapter, value, persistent=True)

    def get(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def pop(self, adapter: str) -> None:
        self._buffers.pop(adapter, None)

    def keys(self) -> list[str]:
        return list(self._buffers)

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._buffers


class PackedMasks(AdapterBuffers):
    """Per-adapter 2-D boolean masks, stored bit-packed as persistent uint8 buffers named by adapter.

    ``masks.set("default", m)``, ``masks.get("default")`` → bool tensor, ``"default" in masks``, ``masks.pop(name)``.
    The unpacked width of each mask is kept on the Python side (it is the layer's ``in_features``), so a checkpoint
    holds nothing but the packed bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._widths: dict[str, int] = {}

    def set(self, adapter: str, mask: torch.Tensor) -> None:
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D [out_features, in_features], got shape {tuple(mask.shape)}")
        self.register_buffer(adapter, pack_mask(mask.detach().bool()), persistent=True)
        self._widths[adapter] = mask.shape[-1]

    def packed(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def width(self, adapter: str) -> int:
        return self._widths[adapter]

    def get(self, adapter: str) -> torch.Tensor:
        return unpack_mask(self._buffers[adapter], self._widths[adapter])

    def pop(self, adapter: str) -> None:
        super().pop(adapter)
        self._widths.pop(adapter, None)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)} packed" for k, v in self._buffers.items())
