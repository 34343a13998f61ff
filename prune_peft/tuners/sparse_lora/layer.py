"""SparseLoRA layers: peft's LoRA layers with the SQFT update ``ΔW = M ⊙ s·B A`` (mask applied everywhere)."""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear

from ...kernels.adapters import masked_lora_24
from ...kernels.semi_structured import SemiStructuredLinear
from ...sparsity.adapters import masked_lora, masked_lora_delta, masked_lora_merged
from .._base import SparseAdapterLayer, layer_mapping

__all__ = ["SparseLoraLinear", "layer_mapping_sparse_lora"]


class SparseLoraLayerMixin(SparseAdapterLayer):
    method = "sparse_lora"

    def _pp_setup(self, adapter: str, config, weight: torch.Tensor | None) -> None:
        self._pp_opts[adapter]["grad_mode"] = config.grad_mode

    def _pp_args(self, adapter: str):
        return (
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.lora_sparse_mask.packed(adapter),
            self.in_features,
            self.scaling[adapter],
            self._pp_opts[adapter].get("grad_mode", "exact"),
        )

    def _pp_delta(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        with torch.no_grad():
            return masked_lora_delta(A, B, self.sparse_mask(adapter).to(A.device), self.scaling[adapter])

    def _pp_branch(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        return masked_lora(x, None, None, *self._pp_args(adapter))

    def _pp_fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        A, B, packed, width, scaling, grad_mode = self._pp_args(adapter)
        base = self.get_base_layer()
        if isinstance(base, SemiStructuredLinear):  # 2:4 base: [W | ΔW] as one sparse GEMM (kernels.adapters)
            return masked_lora_24(x, base, self._pp_weight, A, B, packed, width, scaling, grad_mode, adapter)
        return masked_lora(x, self._pp_weight, base.bias, A, B, packed, width, scaling, grad_mode)

    def _pp_merged_weight(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return masked_lora_merged(weight, self._pp_delta(adapter).to(weight.device))

    def _pp_unmerged_weight(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        return masked_lora_merged(weight, self._pp_delta(adapter).to(weight.device), sign=-1.0)


class SparseLoraLinear(SparseLoraLayerMixin, LoraLinear):
    """SparseLoRA on a float ``nn.Linear``."""

    def __repr__(self) -> str:
        return "sparse_lora." + super().__repr__().removeprefix("lora.")


def _bnb_4bit() -> type:
    from .bnb import SparseLoraLinear4bit  # bitsandbytes is imported only here, when it is installed

    return SparseLoraLinear4bit


def _bnb_8bit() -> type:
    from .bnb import SparseLoraLinear8bitLt

    return SparseLoraLinear8bitLt


def layer_mapping_sparse_lora() -> dict:
    """peft's custom-module dispatch (``_register_custom_module``): float and bitsandbytes bases."""
    return layer_mapping(SparseLoraLinear, _bnb_4bit, _bnb_8bit)
