"""SPP layers: peft's LoRA layers whose ``lora_A`` holds ``W_row`` (R×d_in) and ``lora_B`` holds ``w_col`` (d_out)."""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ...sparsity.adapters import spp, spp_branch, spp_delta, spp_merged, spp_scale
from .._base import SparseAdapterLayer, layer_mapping

__all__ = ["SPPLinear", "layer_mapping_spp", "spp_blocks"]


def spp_blocks(out_features: int, n_blocks: int) -> list[tuple[int, int]]:
    """Row ranges of the R blocks (equal when R divides d_out, else ``torch.tensor_split`` sizes)."""
    base, extra = divmod(out_features, n_blocks)
    bounds, start = [], 0
    for k in range(n_blocks):
        size = base + (1 if k < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


class SPPLayerMixin(SparseAdapterLayer):
    method = "spp"

    def _pp_validate(self, adapter: str, config, weight, name) -> None:
        super()._pp_validate(adapter, config, weight, name)
        rows, blocks = self.out_features, config.n_blocks
        where = name or type(self).__name__
        if rows < blocks:
            raise ValueError(f"spp: {where} has {rows} output rows, fewer than n_blocks={blocks}; lower n_blocks")
        if rows % blocks and config.on_indivisible == "error":
            raise ValueError(
                f"spp: {where} has {rows} output rows, not divisible by n_blocks={blocks}: pick n_blocks dividing "
                f"{rows}, or on_indivisible='uneven' (blocks of {math.ceil(rows / blocks)} and {rows // blocks} rows)"
            )

    def _pp_setup(self, adapter: str, config, weight) -> None:
        old = self.lora_A[adapter].weight
        trainable = old.requires_grad
        row = nn.Linear(self.in_features, config.n_blocks, bias=False, device=old.device, dtype=old.dtype)
        col = nn.Linear(1, self.out_features, bias=False, device=old.device, dtype=old.dtype)
        if config.init_lora_weights is False:
            nn.init.normal_(col.weight)  # a clearly non-identity start, for tests
        else:
            nn.init.kaiming_uniform_(row.weight, a=math.sqrt(5))
            nn.init.zeros_(col.weight)  # w_col = 0: the adapter starts as the identity
        self.lora_A[adapter], self.lora_B[adapter] = row, col
        self._move_adapter_to_device_of_base_layer(adapter)
        self.lora_A[adapter].requires_grad_(trainable)
        self.lora_B[adapter].requires_grad_(trainable)
        bounds = spp_blocks(self.out_features, config.n_blocks)
        self._pp_opts[adapter].update(bounds=bounds, fuse=config.forward_mode == "fused", row_block={})

    def _pp_row_block(self, adapter: str, device: torch.device) -> torch.Tensor:
        cache = self._pp_opts[adapter]["row_block"]
        if device not in cache:
            sizes = torch.tensor([b - a for a, b in self._pp_opts[adapter]["bounds"]], device=device)
            cache[device] = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
        return cache[device]

    def _pp_params(self, adapter: str):
        W_row, w_col = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return W_row, w_col, self._pp_row_block(adapter, W_row.device), self.scaling[adapter]

    def _pp_base_of(self, weight: torch.Tensor, merged: list[str]) -> torch.Tensor:
        """Recover W from ``W ⊙ (1 + Σ S_a)`` (the merged adapters' updates all scale the original W)."""
        if not merged:
            return weight
        total = None
        for adapter in merged:
            W_row, w_col, row_block, s = self._pp_params(adapter)
            scale = spp_scale(W_row, w_col, row_block, s)
            total = scale if total is None else total.add_(scale)
        return weight.to(total.dtype) / (1 + total.to(weight.device))

    @torch.no_grad()
    def _pp_delta(self, adapter: str, base: torch.Tensor | None = None) -> torch.Tensor:
        W_row, w_col, row_block, s = self._pp_params(adapter)
        if base is None:
            base = self._pp_base_of(self._pp_weight(), list(self.merged_adapters))
        return spp_delta(base.to(W_row.device), W_row, w_col, row_block, s)

    def _pp_branch(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        W_row, w_col, row_block, s = self._pp_params(adapter)
        bounds = self._pp_opts[adapter]["bounds"]
        blockwise = not self._pp_opts[adapter]["fuse"]
        return spp_branch(x, self._pp_weight, W_row, w_col, row_block, bounds, s, blockwise)

    def _pp_fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        W_row, w_col, row_block, s = self._pp_params(adapter)
        return spp(x, self._pp_weight, self.get_base_layer().bias, W_row, w_col, row_block, s)

    @torch.no_grad()
    def _pp_merged_weight(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        base = self._pp_base_of(weight, list(self.merged_adapters))
        return spp_merged(weight, base, *self._pp_params(adapter))

    @torch.no_grad()
    def _pp_unmerged_weight(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        base = self._pp_base_of(weight, [*self.merged_adapters, adapter])
        return spp_merged(weight, base, *self._pp_params(adapter), sign=-1.0)


class SPPLinear(SPPLayerMixin, LoraLinear):
    """SPP on a float ``nn.Linear``."""

    def __repr__(self) -> str:
        return "spp." + super().__repr__().removeprefix("lora.")


def _bnb_4bit() -> type:
    from .bnb import SPPLinear4bit  # bitsandbytes is imported only here, when it is installed

    return SPPLinear4bit


def _bnb_8bit() -> type:
    from .bnb import SPPLinear8bitLt

    return SPPLinear8bitLt


def layer_mapping_spp() -> dict:
    """peft's custom-module dispatch (``_register_custom_module``): float and bitsandbytes bases."""
    return layer_mapping(SPPLinear, _bnb_4bit, _bnb_8bit)
