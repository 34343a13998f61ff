"""LoRAPrune on bitsandbytes bases (4-bit nf4/fp4 and LLM.int8): importable only when bitsandbytes is installed.

As peft's ``peft.tuners.lora.bnb``, this module imports bitsandbytes at import time and defines a layer class per base
type the installed bitsandbytes provides; :func:`~prune_peft.tuners.loraprune.layer.layer_mapping_loraprune` imports
it lazily (after peft's ``is_bnb_available()`` / ``is_bnb_4bit_available()``) for peft's custom-module dispatch.

What changes against a float base:

* **Row masks** (heads, channels) multiply the layer output, exactly as on a float base: the base output is
  bitsandbytes' own quantized product, the LoRA branch is peft's.
* **Element masks** (unstructured, N:M) cannot be written into a quantized weight (an nf4 block shares one absmax,
  so zeroing weights in place changes the block's other weights on re-quantization). The forward computes
  ``x (E ⊙ Ŵ)ᵀ + b + s·dropout(x) (E ⊙ BA)ᵀ`` from the de-quantized weight ``Ŵ``, formed for the product and
  dropped right after; the backward forms it again (:class:`_MaskedQuantizedLinear`). Autograd keeps only the
  activations, the factors and the bit-packed mask, never a d_out × d_in tensor — the same trade as bitsandbytes'
  own 4-bit matmul (de-quantize per use). On an int8 base this product uses the de-quantized weight, not
  LLM.int8's int8 GEMM, so masked outputs carry no activation-quantization error.
* **Importance** reads ``Ŵ`` one module at a time (:meth:`dense_base_weight`), released after scoring.
* **Merging**: ``merge_and_unload()`` returns a plain ``nn.Linear`` holding ``rows ⊙ E ⊙ (Ŵ + s·BA)`` (computed in
  fp32, stored in the layer's compute dtype); an in-place ``merge()`` (``merge_adapter``) would re-quantize the
  merged weight and is refused before anything changes, as is ``compact()`` on the quantized layer (its packed
  storage cannot be sliced): unload first, then compact.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...sparsity.adapters import compute_dtype
from ...sparsity.packing import unpack_mask
from .._base import _is_bnb_param, dense_weight
from .layer import LoRAPruneLayer

__all__: list[str] = ["LoRAPruneQuantizedLayer"]


class _MaskedQuantizedLinear(torch.autograd.Function):
    """``y = x (E ⊙ Ŵ)ᵀ + xd (E ⊙ s·BA)ᵀ`` in the compute dtype ``cd``; ``Ŵ`` de-quantized from the base layer.

    Every d_out × d_in operand (``Ŵ``, ``E``, the masked update and its gradient) is formed when needed, in forward and
    again in backward, and dropped right after. Gradients: ``∂x = g (E ⊙ Ŵ)``, ``∂xd = g (E ⊙ s·BA)``, and with
    ``G = s·E ⊙ (gᵀ xd)`` (fp32): ``∂B = G Aᵀ``, ``∂A = Bᵀ G``.
    """

    @staticmethod
    def forward(ctx, x, xd, A, B, base, packed, width, scaling, cd):
        ctx.base, ctx.width, ctx.scaling, ctx.cd = base, width, scaling, cd
        ctx.save_for_backward(x, xd, A, B, packed)
        E = unpack_mask(packed, width)
        W = dense_weight(base).to(cd).mul_(E)
        y = F.linear(x.to(cd), W)
        del W
        D = (B @ A).mul_(E).mul_(scaling).to(cd)  # formed in the adapter dtype, then one rounding to cd
        return y.add_(F.linear(xd.to(cd), D))

    @staticmethod
    def backward(ctx, g):
        x, xd, A, B, packed = ctx.saved_tensors
        E = unpack_mask(packed, ctx.width)
        cd, s = ctx.cd, ctx.scaling
        gc = g.to(cd)
        gx = gxd = gA = gB = None
        if ctx.needs_input_grad[0]:
            W = dense_weight(ctx.base).to(cd).mul_(E)
            gx = (gc @ W).to(x.dtype)
            del W
        if ctx.needs_input_grad[1]:
            D = (B @ A).mul_(E).mul_(s).to(cd)
            gxd = (gc @ D).to(xd.dtype)
            del D
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g2, x2 = g.reshape(-1, g.shape[-1]).float(), xd.reshape(-1, xd.shape[-1]).float()
            G = (g2.t() @ x2).mul_(E).mul_(s)
            gB = (G @ A.float().t()).to(B.dtype) if ctx.needs_input_grad[3] else None
            gA = (B.float().t() @ G).to(A.dtype) if ctx.needs_input_grad[2] else None
        return gx, gxd, gA, gB, None, None, None, None, None


class LoRAPruneQuantizedLayer(LoRAPruneLayer):
    """LoRAPrune's mask logic on a bitsandbytes base (mixed in before peft's ``lora.bnb`` layer class)."""

    quantized = True

    @staticmethod
    def _pp_check_base(base: nn.Module) -> None:
        if _is_bnb_param(getattr(base, "weight", None)) is None:
            LoRAPruneLayer._pp_check_base(base)

    def dense_base_weight(self) -> torch.Tensor:
        """A transient de-quantized copy of the base weight (bitsandbytes' own de-quantization)."""
        return dense_weight(self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.__dict__["_pp_input_dtype"] = x.dtype  # an int8 base has no compute dtype: unload in the activations'
        return super().forward(x, *args, **kwargs)

    def _pp_elementwise(self, x, adapter, emask, rows) -> torch.Tensor:
        """y = x (E ⊙ Ŵ)ᵀ + b + s·dropout(x) (E ⊙ BA)ᵀ with no dense weight kept for the backward."""
        base = self.get_base_layer()
        autocast = torch.is_autocast_enabled(x.device.type)
        cd = compute_dtype(x) if autocast else self._pp_compute_dtype(x)
        store = self.lora_prune_emask  # ``emask`` is the packed buffer: unpacked inside the autograd function
        out = _MaskedQuantizedLinear.apply(
            x,
            self.lora_dropout[adapter](x),
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            base,
            store.packed(adapter),
            store.width(adapter),
            self.scaling[adapter],
            cd,
        )
        if base.bias is not None:
            out = out + base.bias.to(cd)
        if not autocast:
            out = out.to(x.dtype)  # as bitsandbytes' layers: the output in the input's dtype
        return out * rows if rows is not None else out

    def _pp_compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """bitsandbytes' GEMM dtype: a 4-bit layer's ``compute_dtype`` (when set), else the input's."""
        return getattr(self.get_base_layer(), "compute_dtype", None) or x.dtype

    # ------------------------------------------------------------------------------------------ merge / compact

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: merging into a quantized weight re-quantizes it (ValueError before anything changes)."""
        if not check_adapters_to_merge(self, adapter_names):
            return
        raise ValueError(
            f"loraprune: merge() into a bitsandbytes {type(self.get_base_layer()).__name__} base is not supported: it "
            "would re-quantize the merged weight (the update and every kept weight rounded to the quantization grid). "
            "Use merge_and_unload(), which returns de-quantized nn.Linear layers holding mask ⊙ (W + s·BA), or keep "
            "the adapter unmerged."
        )

    def compact_masks(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        raise ValueError(
            f"compact: a bitsandbytes {type(self.get_base_layer()).__name__} base cannot be sliced (its weight is "
            "packed quantized storage); call merge_and_unload() first (de-quantized nn.Linear layers, masks baked "
            "in) and compact the merged model"
        )

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """peft's unload hook: the quantized base (``merge=False``) or a de-quantized ``nn.Linear`` holding
        ``rows ⊙ E ⊙ (Ŵ + s·BA)`` and ``rows ⊙ b``, computed in fp32."""
        base = self.get_base_layer()
        if not merge:
            return base
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        weight = dense_weight(base).float()
        bias = base.bias.detach().float() if base.bias is not None else None
        for adapter in names:
            weight = weight + self.get_delta_weight(adapter).float()
            elems, rows = self.element_mask(adapter), self.row_mask(adapter)
            if elems is not None:
                weight = weight * elems.to(weight.device)
            if rows is not None:
                weight = weight * rows.to(weight.device)[:, None]
                bias = bias * rows.to(bias.device) if bias is not None else None
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        dtype = self._pp_unload_dtype()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device)
        linear.to(dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    def _pp_unload_dtype(self) -> torch.dtype:
        """The unloaded layer's dtype: the 4-bit compute dtype, else the bias's, else the dtype of the activations
        the layer last saw (an int8 base has none of its own), else fp32 with a warning."""
        base = self.get_base_layer()
        dtype = getattr(base, "compute_dtype", None)
        if dtype is None and base.bias is not None:
            dtype = base.bias.dtype
        if dtype is None:
            dtype = self.__dict__.get("_pp_input_dtype")
        if dtype is None:
            warnings.warn(
                f"loraprune: the {type(base).__name__} base has no compute dtype and has not run a forward pass; it "
                "is unloaded as a float32 nn.Linear (cast the merged model with .to(dtype) if it runs in half "
                "precision)",
                UserWarning,
                stacklevel=2,
            )
            dtype = torch.float32
        return dtype


if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as _LoraLinear8bitLt

    class LoRAPruneLinear8bitLt(LoRAPruneQuantizedLayer, _LoraLinear8bitLt):
        """LoRAPrune on a bitsandbytes LLM.int8 base (``Linear8bitLt``)."""

    __all__ += ["LoRAPruneLinear8bitLt"]

if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit

    class LoRAPruneLinear4bit(LoRAPruneQuantizedLayer, _LoraLinear4bit):
        """LoRAPrune on a bitsandbytes 4-bit base (``Linear4bit``, nf4/fp4), QLoRA style."""

    __all__ += ["LoRAPruneLinear4bit"]
