"""Machinery shared by the sparsity-preserving adapter types (SparseLoRA, SPP).

Layers subclass peft's own LoRA layers (``lora.Linear``, ``lora.bnb.Linear4bit``, ``lora.bnb.Linear8bitLt``) with
:class:`SparseAdapterLayer` mixed in first. The adapter math plugs in through peft's ``LoraVariant`` hooks
(forward / merge_safe / merge_unsafe / unmerge, dispatched by every peft version from 0.17 on), and a fused
fast path replaces the whole layer forward when a single adapter is active.

Each adapter keeps, next to its factors, the base's mask M (bit-packed, ``lora_sparse_mask``) and the number of
non-zeros of the base when M was fixed (``lora_sparse_nnz``). Both are saved with the adapter. Before a merge, and
when an adapter is loaded, the base is checked against them, so an adapter never lands on a base whose zeros moved.

The tuner mixin (:class:`SparseTunerMixin`) makes injection all-or-nothing (a failing layer rolls back the layers
already replaced), checks every layer before a merge touches any, validates masks before a checkpoint is loaded,
and unloads quantized bases to dequantized sparse ``nn.Linear`` layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._dist import all_reduce_sum, counts_once, gathered_call, is_sharded, local, local_rows
from ..sparsity.masks import describe_pattern, mask_mismatch
from ._buffers import AdapterBuffers, PackedMasks
from ._fsdp import check_base_for_adapters, refuse_gathered_base, reshard_for_merge, shard_new_adapters
from ._registry import current_injection, injecting, layer_takes_config, strip_retype_guard, with_retype_guard

__all__ = [
    "SparseAdapterLayer",
    "SparseConfigMixin",
    "SparseTunerMixin",
    "adapter_digests",
    "dense_weight",
    "set_sparse_masks",
    "sparse_layers",
]

VARIANT_KWARG_KEYS = ("alora_offsets",)
# init_lora_weights values that rewrite the *base* weight (PiSSA, OLoRA, CorDA, LoftQ) would destroy its zeros
SAFE_INITS = (True, False, "gaussian", "orthogonal")


def _is_bnb_param(weight: torch.Tensor) -> str | None:
    name = type(weight).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (dequantized) weight of a linear layer as a plain tensor, without touching the module."""
    weight = module.weight
    kind = _is_bnb_param(weight)
    if kind is None:
        return weight.detach()
    import bitsandbytes.functional as bnbF

    if kind == "4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight in place for its CPU (AVX512-BF16) kernel on the first no-grad eval
            # forward; dequantize_4bit does not read that layout. Undo the code layout on a copy of the state (the
            # inverse rewrites the state it is given) and leave the module as it is. The repack stores absmax
            # de-nested as bf16 [in/blocksize, out]; the inverse leaves it transposed (wrong blocks once
            # in_features > blocksize) or re-quantizes it, so it is put back in block order here: the values the
            # CPU kernel multiplies with.
            import copy

            state = copy.deepcopy(state)
            absmax = state.absmax.T.reshape(-1).float()
            state.original_nested = False
            data, state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, state)
            state.absmax = absmax
            return bnbF.dequantize_4bit(data, state)
        return bnbF.dequantize_4bit(weight.data, state)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    if hasattr(bnbF, "int8_vectorwise_dequant"):
        return bnbF.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return weight.data.float() * scb.to(weight.device).view(-1, 1) * (1.0 / 127.0)


_PLAIN = (torch.Tensor, nn.Parameter)


def _mismatch(weight: torch.Tensor, mask: torch.Tensor, nnz: int | None) -> str | None:
    """:func:`~prune_peft.sparsity.masks.mask_mismatch` for any base weight. A DTensor shard (FSDP2) is compared with
    the matching rows of the mask and the two counts are summed over ranks: every rank gets the same verdict and no
    rank gathers the weight. Every rank must call it (an all-reduce of two integers)."""
    if not is_sharded(weight) or tuple(weight.shape) != tuple(mask.shape):
        return mask_mismatch(weight, mask, nnz)  # the shape message needs no values (shapes are global)
    first, end = local_rows(weight)
    part = local(weight)
    nonzero = part != 0
    counts = torch.stack([(nonzero & ~mask[first:end].to(part.device)).sum(), nonzero.sum()]).to(torch.int64)
    if not counts_once(weight):  # a replica of a shard another rank already counts (HSDP)
        counts = torch.zeros_like(counts)
    outside, now = (int(c) for c in all_reduce_sum(counts))
    if outside:
        return f"the base has {outside} non-zero weights where the adapter's mask is zero"
    if nnz is not None and now != nnz:
        return f"the base has {now} non-zero weights inside the mask, the adapter was made for {nnz}"
    return None


def refuse_sharded_base(model: nn.Module, method: str, loading: bool = False) -> str | None:
    """Before an adapter is created on (or loaded into) ``model``: ``"fsdp2"`` when its base is FSDP2-sharded in a
    layout the new adapter can be sharded beside (:func:`~prune_peft.tuners._fsdp.shard_new_adapters` runs after the
    injection), None when unsharded, ValueError for every other sharded setup (see
    :func:`~prune_peft.tuners._fsdp.check_base_for_adapters`)."""
    return check_base_for_adapters(model, method, loading)


def check_base_layer(base_layer: nn.Module, method: str, name: str | None) -> None:
    """Only float ``nn.Linear`` weights and bitsandbytes 4/8-bit weights are understood; anything else is refused."""
    weight = getattr(base_layer, "weight", None)
    where = f" ({name})" if name else ""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{method}: cannot adapt {type(base_layer).__name__}{where}: it has no weight tensor")
    plain = type(weight) in _PLAIN or (is_sharded(weight) and type(weight.to_local()) in _PLAIN)  # FSDP2 shard
    if _is_bnb_param(weight) is None and (not weight.dtype.is_floating_point or not plain):
        raise ValueError(
            f"{method}: cannot adapt {type(base_layer).__name__}{where} with weight type {type(weight).__name__} "
            f"({weight.dtype}): supported bases are torch.nn.Linear with float weights and bitsandbytes "
            "Linear4bit (nf4/fp4) / Linear8bitLt"
        )


class _SparseVariant(LoraVariant):
    """Routes peft's variant hooks to the layer's own sparsity-preserving math."""

    def supports_lora_conversion(self) -> bool:
        return False  # the update is not B A: converting to plain LoRA would change the model

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return module._pp_merged_weight(active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data = module._pp_merged_weight(active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return module._pp_unmerged_weight(active_adapter, orig_weight.data)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        x = module.lora_dropout[active_adapter](x)
        return result + module._pp_branch(x, active_adapter).to(result.dtype)


class SparseAdapterLayer:
    """Mixin placed *before* a peft LoRA layer class: ``class L(SparseAdapterLayer, peft.tuners.lora.Linear)``.

    Subclasses implement ``_pp_setup``, ``_pp_delta``, ``_pp_branch``, ``_pp_fused_forward``,
    ``_pp_merged_weight`` and ``_pp_unmerged_weight``.
    """

    method: ClassVar[str] = "sparse adapter"
    quantized: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs) -> None:
        ctx_config, name = current_injection()
        config = config if config is not None else ctx_config
        if config is None:
            raise RuntimeError(f"{type(self).__name__} is created by get_peft_model / PeftModel.from_pretrained")
        check_base_layer(
            base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer, self.method, name
        )
        if layer_takes_config():
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        else:
            super().__init__(base_layer, adapter_name, **kwargs)

    # ------------------------------------------------------------------------------------------------ construction

    def update_layer(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        ctx_config, name = current_injection()
        config = kwargs.get("config") or ctx_config
        base = self.get_base_layer()
        weight = None if base.weight.device.type == "meta" else dense_weight(base)
        if is_sharded(weight):  # FSDP2 sharded the base first: the mask (whole on every rank) needs every row
            weight = weight.full_tensor()  # one layer at a time, dropped after the setup (a collective: all ranks)
        self._pp_validate(adapter_name, config, weight, name)
        super().update_layer(adapter_name, r, *args, **kwargs)
        if not hasattr(self, "lora_sparse_mask"):
            self.lora_sparse_mask = PackedMasks()
            self.lora_sparse_nnz = AdapterBuffers()
            self._pp_opts: dict[str, dict[str, Any]] = {}
            self._pp_name = name
        if weight is None:  # meta base (deferred init): real values arrive with load_state_dict
            self.lora_sparse_mask.set(adapter_name, torch.ones(self.out_features, self.in_features, dtype=torch.bool))
            self.lora_sparse_nnz.set(adapter_name, torch.tensor(-1, dtype=torch.int64))
        else:
            mask = weight != 0
            self.lora_sparse_mask.set(adapter_name, mask)
            self.lora_sparse_nnz.set(adapter_name, mask.sum().to(torch.int64).cpu())
        self.lora_sparse_mask.to(base.weight.device if weight is not None else "cpu")
        self.lora_sparse_nnz.to(base.weight.device if weight is not None else "cpu")
        self._pp_opts[adapter_name] = {}
        self._pp_setup(adapter_name, config, weight)
        self.lora_variant[adapter_name] = _SparseVariant()

    def _pp_validate(self, adapter_name: str, config, weight: torch.Tensor | None, name: str | None) -> None:
        if weight is not None and getattr(config, "require_sparsity", False) and not bool((weight == 0).any()):
            raise ValueError(
                f"{self.method}: target module {name or type(self).__name__} has no zero weights, but the adapter "
                "preserves the base's sparsity and require_sparsity=True: prune the model first "
                "(prune_peft.prune), leave the module out (exclude_modules=[...]) or pass require_sparsity=False"
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for store in (self.lora_sparse_mask, self.lora_sparse_nnz):
            store.pop(adapter_name)
        self._pp_opts.pop(adapter_name, None)

    # ---------------------------------------------------------------------------------------------- base and mask

    def _pp_weight(self) -> torch.Tensor:
        """Base weight in the compute dtype (dequantized for bitsandbytes bases)."""
        base = self.get_base_layer()
        weight = dense_weight(base)
        if self.quantized:
            dtype = getattr(base, "compute_dtype", None) or torch.float32
            weight = weight.to(dtype)
        return weight

    def sparse_mask(self, adapter_name: str = "default") -> torch.Tensor:
        """The boolean mask M of an adapter (True = weight kept)."""
        return self.lora_sparse_mask.get(adapter_name)

    def mask_problem(self, adapter_name: str, weight: torch.Tensor | None = None) -> str | None:
        """Why the current base is not the one the adapter's mask was fixed on (None if it is)."""
        nnz = int(self.lora_sparse_nnz.get(adapter_name).item())
        if nnz < 0:
            return None
        weight = dense_weight(self.get_base_layer()) if weight is None else weight
        return _mismatch(weight, self.sparse_mask(adapter_name), nnz)

    # adapter -> [base digest, mask digest] recorded in the config it was injected from; see _pp_check_loaded
    _pp_pending: Mapping[str, list | None] = MappingProxyType({})

    def _pp_adapter_floats(self, adapter: str) -> dict[str, torch.Tensor]:
        """This adapter's float tensors (``lora_*.<adapter>...``; never the base layer's)."""
        return {
            k: v
            for k, v in self.state_dict(keep_vars=True).items()
            if k.split(".")[0].startswith("lora_")
            and k.split(".")[1:2] == [adapter]
            and v.is_floating_point()
            and v.device.type != "meta"
        }

    def _pp_expect_load(self, adapter: str, digests: list | None) -> None:
        """Arm :meth:`_pp_check_loaded`: NaN factors and ``lora_sparse_nnz = -2`` until a load overwrites them."""
        with torch.no_grad():
            for value in self._pp_adapter_floats(adapter).values():
                value.fill_(float("nan"))
        self.lora_sparse_nnz.set(adapter, torch.full_like(self.lora_sparse_nnz.get(adapter), -2))
        self._pp_pending = {**self._pp_pending, adapter: digests}

    def _pp_check_loaded(self) -> None:
        """First forward / merge after an adapter was injected from a saved config (``sparse_digests``): refuse it
        when its weights never arrived (transformers' ``load_adapter`` keeps the injected layers when reading the file
        fails, a file lacking a tensor leaves it as injected; :meth:`_pp_expect_load` marked both), when its mask is
        not the one recorded (tampered file) and when the base's zeros are not the adapter's. Stays armed until it
        passes, so a refused layer refuses every forward."""
        for adapter, want in self._pp_pending.items():
            if adapter not in self.lora_sparse_mask:
                continue  # deleted since
            where = f"{self.method}: adapter {adapter!r} at {self._pp_name or type(self).__name__}"
            unloaded = [k for k, v in self._pp_adapter_floats(adapter).items() if bool(torch.isnan(v).any())]
            if int(self.lora_sparse_nnz.get(adapter).item()) == -2 or unloaded:
                raise RuntimeError(
                    f"{where} was injected from a saved adapter config but its weights were never loaded "
                    f"({', '.join(unloaded) or 'lora_sparse_nnz'}: the load failed part-way or the file lacks them, "
                    "e.g. a truncated adapter_model.safetensors); the layer refuses to run. Remove it "
                    f"(model.delete_adapter({adapter!r})) and load the adapter again from a complete file; to start a "
                    "new adapter from this config set config.sparse_digests=None first"
                )
            problem = self.mask_problem(adapter)
            if problem is None and _listed(want, 2) and _digest(self.lora_sparse_mask.packed(adapter)) != want[1]:
                problem = "its mask does not match the mask digest in adapter_config.json (sparse_digests): tampered"
            whole = getattr(self.get_base_layer().weight, "device_mesh", None) is None  # a DTensor shard: mask_problem
            if problem is None and whole and _listed(want, 1) and base_digest(self) != want[0]:
                problem = "the base's zero pattern does not match the digest in adapter_config.json (sparse_digests)"
            if problem:
                raise ValueError(f"{where} does not fit this model: {problem}; the layer refuses to run")
        self._pp_pending = {}

    def _pp_check_base(self, adapter_names: Iterable[str]) -> None:
        if self._pp_pending:
            self._pp_check_loaded()
        if self.merged:  # the base already holds our own (sparsity-preserving) updates
            return
        weight = None
        for adapter in adapter_names:
            if adapter not in self.lora_sparse_mask:
                continue
            weight = dense_weight(self.get_base_layer()) if weight is None else weight
            problem = self.mask_problem(adapter, weight)
            if problem:
                raise ValueError(
                    f"{self.method}: cannot merge adapter {adapter!r} into {self._pp_name or 'this layer'}: {problem}. "
                    "The base weights changed after the adapter was created; merging would not preserve the "
                    "sparsity the adapter was trained for. Restore the original pruned base, or re-fix the mask "
                    "with prune_peft.tuners.set_sparse_masks."
                )

    def _pp_incoming_problem(self, adapter_name: str, packed: torch.Tensor, nnz: torch.Tensor | None) -> str | None:
        """Check a mask about to be loaded from a checkpoint against this layer's base."""
        expected = (self.out_features, (self.in_features + 7) // 8)
        if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
            return (
                f"saved mask has shape {tuple(packed.shape)} ({packed.dtype}), this layer needs a packed uint8 "
                f"mask of shape {expected} for weight {(self.out_features, self.in_features)}"
            )
        if self.merged or self.get_base_layer().weight.device.type == "meta":
            return None
        from ..sparsity.packing import unpack_mask

        mask = unpack_mask(packed.to(self.get_base_layer().weight.device), self.in_features)
        return _mismatch(
            dense_weight(self.get_base_layer()), mask, None if nnz is None else int(torch.as_tensor(nnz).item())
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers' load_adapter goes straight to load_state_dict (no tuner): validate per layer here
        for key in [k for k in state_dict if k.startswith(prefix + "lora_sparse_mask.")]:
            adapter = key[len(prefix + "lora_sparse_mask.") :]
            if "." in adapter or adapter not in self.lora_sparse_mask:
                continue
            problem = self._pp_incoming_problem(
                adapter, state_dict[key], state_dict.get(f"{prefix}lora_sparse_nnz.{adapter}")
            )
            if problem:
                raise ValueError(f"{self.method}: adapter {adapter!r} does not fit {prefix.rstrip('.')}: {problem}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --------------------------------------------------------------------------------------------------- forward

    def _pp_single(self, args: tuple, kwargs: dict) -> str | None:
        """The single active adapter when this layer's own forward applies, else None (peft's path, our variant)."""
        if self.disable_adapters or self.merged or args:
            return None
        if any(kwargs.get(k) is not None for k in kwargs):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        return active[0] if len(active) == 1 else None

    def _pp_fusable(self, adapter: str) -> bool:
        """Whether base and update may run as one autograd Function on ``W`` (no dropout on the branch input, no
        hooks on the base that a direct use of its weight would skip)."""
        if not self._pp_opts.get(adapter, {}).get("fuse", True):
            return False
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            return False
        base = self.get_base_layer()
        return not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One active adapter: ``base(x) + branch(dropout(x))`` with the branch GEMM in the compute dtype (the
        autocast dtype, else the input's), or the fused Function when nothing sits between ``x`` and the base
        (it keeps ``W + ΔW`` in ≥ fp32 or runs two GEMMs in half precision, see :mod:`prune_peft.sparsity.adapters`).
        The update is never added to a half-precision weight."""
        if self._pp_pending:
            self._pp_check_loaded()
        adapter = self._pp_single(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        if self._pp_fusable(adapter):
            return self._pp_fused_forward(x, adapter)
        result = self.base_layer(x)
        branch = self._pp_branch(self.lora_dropout[adapter](x), adapter)
        return result + branch.to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        # peft < 0.21 ignores variants here; one implementation for every version
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs).clone()
        for adapter in sorted(set(adapter_names)):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            sub = self._cast_input_dtype(x[rows], self.lora_A[adapter].weight.dtype)
            branch = self._pp_branch(self.lora_dropout[adapter](sub), adapter)
            result[rows] = result[rows] + branch.to(result.dtype)
        return result

    # -------------------------------------------------------------------------------------------------- merging

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        refuse_gathered_base(self, "merge")  # FSDP2 root above the tuner holding this layer gathered
        names = adapter_names if adapter_names is not None else self.active_adapters
        self._pp_check_base([n for n in names if n in self.lora_A and n not in self.merged_adapters])
        if is_sharded(self.get_base_layer().weight):  # FSDP2
            return self._pp_merge_sharded(check_adapters_to_merge(self, adapter_names), safe_merge)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self.merged:
            refuse_gathered_base(self, "unmerge")
        if self.merged and is_sharded(self.get_base_layer().weight):  # FSDP2
            return self._pp_merge_sharded([], False, unmerge=True)
        super().unmerge()

    @torch.no_grad()
    def _pp_merge_sharded(self, names: list[str], safe_merge: bool, unmerge: bool = False) -> None:
        """(Un)merge on an FSDP2-sharded layer: the new weight is computed by the single-process code on this layer's
        gathered full tensors (one layer at a time, :func:`prune_peft._dist.gathered_call`), so it equals the
        single-process merge bit for bit; each rank then writes its own rows into its shard in place (FSDP2 gathers
        from the shards' storage, a new tensor assigned to ``.data`` would be ignored)."""
        if not names and not unmerge:
            return
        base = self.get_base_layer()
        merged_before = list(self.merged_adapters)

        def run() -> torch.Tensor:
            weight = dense_weight(base)  # the gathered full weight during the call
            if unmerge:
                while self.merged_adapters:
                    weight = self._pp_unmerged_weight(self.merged_adapters.pop(), weight)
            for adapter in names:
                weight = self._pp_merged_weight(adapter, weight)
                self.merged_adapters.append(adapter)
            return weight

        try:
            weight = gathered_call(self, run)
            if safe_merge and not torch.isfinite(weight).all():  # the same verdict on every rank (full tensors)
                raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        except BaseException:
            self.merged_adapters[:] = merged_before
            raise
        first, end = local_rows(base.weight)
        local(base.weight).copy_(weight[first:end])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of an adapter in the base dtype (zero wherever the base weight is zero)."""
        return self._pp_delta(adapter).to(self._pp_weight().dtype)

    def _pp_merged_dense(self, adapter_names: list[str], safe_merge: bool) -> torch.Tensor:
        """Merged weight, computed in fp32 on the dequantized base (quantized layers' unload)."""
        weight = dense_weight(self.get_base_layer()).float()
        for adapter in adapter_names:
            weight = self._pp_merged_weight(adapter, weight)
            self.merged_adapters.append(adapter)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_names} seems to be broken")
        return weight


class QuantizedUnloadMixin:
    """For bitsandbytes layers: ``merge_and_unload`` gives a dequantized sparse ``nn.Linear`` (or re-quantizes)."""

    quantized: ClassVar[bool] = True
    _pp_requantize: bool = False
    _pp_unload_dtype: torch.dtype | None = None
    _pp_model_dtype: torch.dtype = torch.float32

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None):
        base = self.get_base_layer()
        if not merge:
            return base
        if self._pp_requantize:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return self.get_base_layer()
        names = check_adapters_to_merge(self, adapter_names)
        self._pp_check_base(names)
        weight = self._pp_merged_dense(names, safe_merge)
        # int8 layers have no compute dtype: default to the dtype of the model's float parameters, so the unloaded
        # layer takes the activations it will receive (an fp32 layer in an fp16 model would fail at the first matmul)
        dtype = self._pp_unload_dtype or getattr(base, "compute_dtype", None) or self._pp_model_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        linear.to(dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- tuner side


def sparse_layers(model: nn.Module) -> dict[str, SparseAdapterLayer]:
    """``{module name: layer}`` of every prune_peft sparse adapter layer in a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseAdapterLayer)}


def _sparsity_summary(layers: Iterable[SparseAdapterLayer], adapter: str) -> dict:
    kept = numel = count = 0

    def masks():  # one unpacked mask at a time; describe_pattern reads them all exactly once
        nonlocal kept, numel, count
        for layer in layers:
            if adapter in layer.lora_sparse_mask:
                mask = layer.sparse_mask(adapter)
                kept += int(mask.sum().item())
                numel += mask.numel()
                count += 1
                yield mask

    pattern = describe_pattern(masks())
    return {"sparsity": 1.0 - kept / max(numel, 1), "pattern": pattern, "modules": count, "weights": numel}


class SparseTunerMixin:
    """Mixin placed before ``LoraModel`` in the tuner classes of sparsity-preserving adapters."""

    method: ClassVar[str] = "sparse adapter"

    def __init__(self, model, peft_config, adapter_name, *args, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, *args, **kwargs)
        self._register_load_state_dict_pre_hook(self._pp_before_load)

    # ---------------------------------------------------------------------------------------------- injection

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        with injecting(lora_config, current_key):
            return super()._create_and_replace(
                lora_config, adapter_name, target, target_name, parent, current_key, **kwargs
            )

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from peft.tuners.lora import LoraModel

        _, name = current_injection()
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"{lora_config.peft_type.value.lower()}: cannot adapt {type(base).__name__} ({name}): only "
                "torch.nn.Linear and bitsandbytes Linear4bit/Linear8bitLt layers are supported; narrow "
                "target_modules or add it to exclude_modules"
            )
        module = LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
        if not isinstance(module, SparseAdapterLayer):  # e.g. a quantization backend we do not handle
            raise ValueError(
                f"{lora_config.peft_type.value.lower()}: cannot adapt {type(base).__name__} ({name}): "
                f"peft dispatched it to {type(module).__name__}, which would not preserve sparsity"
            )
        return module

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, all-or-nothing, followed by the load checks (before any adapter weight is loaded).

        Every path that attaches a saved adapter injects first and loads second (``PeftModel.from_pretrained``,
        ``PeftModel.load_adapter``, transformers' ``model.load_adapter``), so checking here covers them all: the
        config's ``sparse_digests`` (written by :class:`SparseConfigMixin`) must match this base's zero pattern, and a
        config read from a local folder has its weights file read and checked (readable, complete, shapes, masks
        against the base and against the digests). Any failure removes the injected layers again and raises.
        """
        config = self.peft_config.get(adapter_name)
        source = getattr(config, "_pp_source", None)
        loading = source is not None or bool(getattr(config, "sparse_digests", None))
        sharded = refuse_sharded_base(model, self.method, loading)  # before anything is injected
        before = {id(m) for m in model.modules()}
        flags = _trainable_flags(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            if source is not None:  # first: it names the file and the exact problem (shape, truncation, mask)
                self._pp_check_file(model, adapter_name, source, getattr(config, "sparse_digests", None))
            self._pp_check_digests(model, adapter_name, getattr(config, "sparse_digests", None))
            if sharded:  # FSDP2 sharded the base first: each adapted layer becomes its own unit
                shard_new_adapters(model, self.method, adapter_name)
        except BaseException:
            _remove_adapter_layers(model, adapter_name, before, flags=flags)
            raise
        finally:
            if config is not None and source is not None:
                config._pp_source = None  # checked once; a reused config object is not tied to that folder
        self._pp_refresh_card(adapter_name)
        digests = getattr(config, "sparse_digests", None)
        if isinstance(digests, dict) and digests:  # a saved adapter: its weights must arrive before it runs
            for name, layer in sparse_layers(model).items():
                if adapter_name in layer.lora_sparse_mask and int(layer.lora_sparse_nnz.get(adapter_name)) >= 0:
                    layer._pp_expect_load(adapter_name, digests.get(name))
            config._pp_digests = None  # saved again: the file's own digests (checked), not those of the injected masks

    def _pp_refresh_card(self, adapter_name: str) -> None:
        config = self.peft_config.get(adapter_name)
        if config is not None:
            summary = _sparsity_summary(sparse_layers(self.model).values(), adapter_name)
            config._pp_card = {"method": self.method, **summary}
            config._pp_digests = adapter_digests(self.model, adapter_name)  # written to adapter_config.json

    def _pp_check_digests(self, model: nn.Module, adapter_name: str, expected: dict | None) -> None:
        """The base's zero pattern must be the one recorded in the adapter's config (transformers' load path too)."""
        if not expected:
            return
        if not isinstance(expected, dict):
            raise ValueError(
                f"{self.method}: sparse_digests must be a dict {{module: [base, mask]}}, got {expected!r}"
            )
        wrong = []
        for name, layer in sparse_layers(model).items():
            want = expected.get(name)
            if want is None or adapter_name not in layer.lora_sparse_mask or layer.merged:
                continue
            if layer.get_base_layer().weight.device.type == "meta":
                continue
            if not isinstance(want, (list, tuple)) or not want or base_digest(layer) != want[0]:
                wrong.append(name)
        if wrong:
            shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            raise ValueError(
                f"{self.method}: the adapter's masks do not match this base model's zeros: adapter {adapter_name!r} "
                f"was created on a base with other zeros at {len(wrong)} layer(s) ({shown}; adapter_config.json "
                "sparse_digests): load it onto the pruned base it was trained on, or set config.sparse_digests=None "
                "to adapt this base anew"
            )

    def _pp_check_file(self, model: nn.Module, adapter_name: str, source: str, expected: dict | None) -> None:
        """Read and check the adapter weights file of a local folder before anything is loaded from it."""
        import os

        path = os.path.join(source, "adapter_model.safetensors")
        if not os.path.isfile(path):
            return  # .bin or a remote file: peft reports what is missing; the load hooks still check masks
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as exc:
            raise ValueError(
                f"{self.method}: adapter file {path} cannot be read ({type(exc).__name__}: {exc}); it is truncated, "
                "empty or not a safetensors file: save or download the adapter again"
            ) from exc
        problems, zeros = [], False
        for name, layer in sparse_layers(model).items():
            if adapter_name not in layer.lora_sparse_mask:
                continue
            own = {k: v for k, v in layer.state_dict(prefix=f"{name}.").items() if f".{adapter_name}" in k}
            for key, value in own.items():
                saved = tensors.get("base_model.model." + _strip_adapter(key, adapter_name))
                if saved is None:
                    problems.append(f"{key}: missing from the file")
                elif tuple(saved.shape) != tuple(value.shape):
                    problems.append(f"{key}: saved shape {tuple(saved.shape)}, this model needs {tuple(value.shape)}")
            prefix = f"base_model.model.{name}."
            packed = tensors.get(prefix + "lora_sparse_mask")
            if packed is None or tuple(packed.shape) != tuple(layer.lora_sparse_mask.packed(adapter_name).shape):
                continue  # reported above
            problem = layer._pp_incoming_problem(adapter_name, packed, tensors.get(prefix + "lora_sparse_nnz"))
            if problem:
                problems.append(f"{name}: {problem}")
                zeros = True
            want = (expected or {}).get(name)
            if isinstance(want, (list, tuple)) and len(want) > 1 and _digest(packed) != want[1]:
                problems.append(f"{name}: the saved mask does not match its digest in adapter_config.json (tampered)")
        if problems:
            raise _load_error(f"{self.method}: adapter file {path}", problems, zeros)

    # -------------------------------------------------------------------------------------------------- loading

    def _pp_before_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Validate every incoming mask and shape before anything is loaded; on a problem raise, changing nothing.

        Runs for ``set_peft_model_state_dict`` / ``PeftModel.load_adapter`` into an existing adapter (Trainer resume).
        A folder loaded as a new adapter was already checked at injection (:meth:`inject_adapter`).
        """
        marker = ".lora_sparse_mask."
        root = prefix + "model."
        layers = None
        problems = []
        for key, value in state_dict.items():
            if not key.startswith(root) or marker not in key:
                continue
            module_name, adapter = key[len(root) :].rsplit(marker, 1)
            if "." in adapter:
                continue
            layers = sparse_layers(self.model) if layers is None else layers
            layer = layers.get(module_name)
            if layer is None or adapter not in layer.lora_sparse_mask:
                continue
            nnz = state_dict.get(key.replace(marker, ".lora_sparse_nnz."))
            problem = layer._pp_incoming_problem(adapter, value, nnz)
            if problem:
                problems.append(f"{module_name}: {problem}")
        zeros = bool(problems)
        problems += self._pp_shape_problems(state_dict, prefix)
        if problems:  # raised before any tensor is copied: the model stays exactly as it was
            raise _load_error(self.method, problems, zeros)

    def _pp_shape_problems(self, state_dict, prefix: str) -> list[str]:
        """Incoming adapter tensors whose shape differs from ours (torch would copy the others, then raise)."""
        own = self.state_dict()
        out = []
        for key, value in state_dict.items():
            if not key.startswith(prefix) or ".lora_" not in key:
                continue
            mine = own.get(key[len(prefix) :])
            if mine is not None and hasattr(value, "shape") and tuple(value.shape) != tuple(mine.shape):
                out.append(
                    f"{key[len(prefix) :]}: saved shape {tuple(value.shape)}, this model has {tuple(mine.shape)}"
                )
        return out

    # -------------------------------------------------------------------------------------------------- merging

    def _pp_check_all(self, adapter_names: list[str] | None) -> None:
        reshard_for_merge(self.model)  # FSDP2: merge into the shards, never into a gathered copy (ValueError)
        for layer in sparse_layers(self.model).values():
            names = adapter_names if adapter_names is not None else layer.active_adapters
            layer._pp_check_base([n for n in names if n in layer.lora_A and n not in layer.merged_adapters])

    def merge_adapter(self, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", args[0] if args else None)
        self._pp_check_all(adapter_names)
        return super().merge_adapter(*args, **kwargs)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        *,
        requantize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Merge the adapters and return the base model; every zero of the pruned base stays zero.

        bitsandbytes bases come back *dequantized* (``dtype``, default the layer's compute dtype; int8 layers, which
        have none, take the dtype of the model's float parameters) so the merged sparse weights are exact (computed
        in fp32, cast once); ``requantize=True`` instead re-quantizes in place (nf4/fp4/int8 map 0 to 0, so the
        zeros survive, the other weights take the usual rounding error).
        """
        self._pp_check_all(adapter_names)
        layers = sparse_layers(self.model).values()
        floats = [  # the base model's own float parameters (adapters are kept in fp32 by peft)
            p.dtype
            for n, p in self.model.named_parameters()
            if "lora_" not in n and p.dtype.is_floating_point and not _is_bnb_param(p)
        ]
        model_dtype = max(set(floats), key=floats.count) if floats else torch.float32
        for layer in layers:
            layer._pp_requantize, layer._pp_unload_dtype = requantize, dtype
            layer._pp_model_dtype = model_dtype
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        if not requantize:
            _drop_quantization_metadata(model)
        return model


def _trainable_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Every parameter's ``requires_grad``: peft's injection freezes the base, a rolled-back one must not."""
    return [(p, p.requires_grad) for p in model.parameters()]


def _listed(value, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) >= n


def _load_error(where: str, problems: list[str], zeros: bool) -> ValueError:
    """One message for every refused load: what is wrong (zeros or fit), the first five problems, what to do."""
    shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
    what = "the adapter's masks do not match this base model's zeros" if zeros else "it does not fit this model"
    return ValueError(
        f"{where}: {what} ({len(problems)} problem(s)); load the adapter onto the pruned base and configuration it "
        f"was saved with:\n  {shown}"
    )


def _remove_adapter_layers(
    model: nn.Module,
    adapter_name: str,
    keep: set[int],
    everything: bool = False,
    layer_cls: type | None = None,
    flags: list[tuple[nn.Parameter, bool]] | None = None,
) -> None:
    """Undo an injection: layers created by it go back to their base layer, older ones lose the adapter.

    ``layer_cls``: the adapter layer class to look for (default :class:`SparseAdapterLayer`). ``flags``: the
    parameters' ``requires_grad`` before the injection (:func:`_trainable_flags`), restored.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, layer_cls or SparseAdapterLayer):
            continue
        if everything or id(module) not in keep:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
        elif adapter_name in getattr(module, "lora_A", {}):
            module.delete_adapter(adapter_name)
    for param, requires_grad in flags or ():
        param.requires_grad_(requires_grad)


def _drop_quantization_metadata(model: nn.Module) -> None:
    """After a dequantizing unload nothing is quantized any more: let transformers forget it ever was."""
    if any(_is_bnb_param(p) for p in model.parameters()):
        return  # untargeted layers are still quantized; keep the metadata that describes them
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


# ---------------------------------------------------------------------------------------------------- given masks


def set_sparse_masks(model: nn.Module, masks: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Replace the derived masks M of an adapter with given ones (before training).

    ``masks`` maps module names (``model.layers.0.self_attn.q_proj``; a ``base_model.model.`` prefix is accepted)
    to boolean tensors of the weight's shape. A mask must keep every non-zero of the base weight (the adapter may
    update weights the mask keeps, never weights it drops). Everything is validated before anything is written.
    """
    layers = sparse_layers(model)
    by_short = {}
    for name, layer in layers.items():
        short = name.removeprefix("base_model.model.")
        by_short[short] = layer
    staged = []
    for name, mask in masks.items():
        short = name.removeprefix("base_model.model.")
        layer = by_short.get(short)
        if layer is None:
            raise ValueError(f"masks: no prune_peft adapter layer named {name!r}; known: {sorted(by_short)[:5]} ...")
        if adapter_name not in layer.lora_sparse_mask:
            raise ValueError(f"masks: layer {name!r} has no adapter {adapter_name!r}")
        if layer.merged:
            raise ValueError(f"masks: layer {name!r} has merged adapters; unmerge before changing masks")
        if is_sharded(layer.get_base_layer().weight):
            raise ValueError(f"masks: layer {name!r} is sharded (FSDP2); set masks before fully_shard")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (layer.out_features, layer.in_features):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"masks[{name!r}] has shape {shape}, the weight is {(layer.out_features, layer.in_features)}"
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"masks[{name!r}] must be boolean (or 0/1), got dtype {mask.dtype}")
            mask = mask != 0
        weight = dense_weight(layer.get_base_layer())
        dropped = int(((weight != 0) & ~mask.to(weight.device)).sum().item())
        if dropped:
            raise ValueError(
                f"masks[{name!r}] drops {dropped} non-zero weights of the base: a mask must keep every non-zero "
                "(prune the base with the mask first)"
            )
        staged.append((layer, mask.to(weight.device), int((weight != 0).sum().item())))
    for layer, mask, nnz in staged:
        layer.lora_sparse_mask.set(adapter_name, mask)
        layer.lora_sparse_nnz.set(adapter_name, torch.tensor(nnz, dtype=torch.int64))
    tuner = getattr(model, "base_model", model)
    if isinstance(tuner, SparseTunerMixin):
        tuner._pp_refresh_card(adapter_name)


# ------------------------------------------------------------------------------------------ digests (load checks)


def _digest(packed: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over a bit-packed uint8 mask and its shape (device-independent)."""
    import hashlib

    h = hashlib.sha256(str(tuple(packed.shape)).encode())
    h.update(packed.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_digest(layer: SparseAdapterLayer) -> str:
    """Digest of the zero pattern of a layer's (dequantized) base weight: ``W ≠ 0``, bit-packed."""
    from ..sparsity.packing import pack_mask

    weight = dense_weight(layer.get_base_layer())
    if is_sharded(weight):  # FSDP2 (only at injection on a sharded base, where every rank calls it): all rows
        weight = weight.full_tensor()
    return _digest(pack_mask(weight != 0))


def adapter_digests(model: nn.Module, adapter_name: str) -> dict[str, list[str]]:
    """``{module name: [digest of the base's zero pattern, digest of the adapter's mask]}`` (see :func:`_digest`)."""
    out = {}
    for name, layer in sparse_layers(model).items():
        if adapter_name not in layer.lora_sparse_mask or layer.merged:
            continue
        if int(layer.lora_sparse_nnz.get(adapter_name).item()) < 0:  # meta base: values not known yet
            continue
        out[name] = [base_digest(layer), _digest(layer.lora_sparse_mask.packed(adapter_name))]
    return out


def _strip_adapter(key: str, adapter_name: str) -> str:
    """``a.lora_A.default.weight`` → ``a.lora_A.weight``: a module key as peft saves it (adapter name removed)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == adapter_name:
            del parts[i]
            break
    return ".".join(parts)


@dataclass
class SparseConfigMixin:
    """Config fields and hooks shared by the sparsity-preserving adapter configs (placed before ``LoraConfig``).

    ``sparse_digests`` is written to ``adapter_config.json`` on save: per target module, a digest of the base's zero
    pattern and of the adapter's mask. On load it is checked against the base before any weight is loaded (every
    load path, transformers' ``model.load_adapter`` included) and against the masks in the weights file, so an
    adapter never lands on a base with other zeros and a tampered mask is refused. ``from_pretrained`` remembers a
    local source folder so the tuner can read and check the weights file before injecting.

    A config edited to ``"peft_type": "LORA"`` is refused by stock peft: :meth:`to_dict` writes the
    :func:`~prune_peft.tuners._registry.retype_guard` marker into ``target_parameters``, a string ``LoraConfig``
    rejects (``TypeError``) before anything is injected; :meth:`__post_init__` turns it back into ``None`` here.
    """

    sparse_digests: dict | None = field(
        default=None,
        metadata={
            "help": "Written on save, checked on load: {module: [digest of the base's zero pattern, digest of the "
            "mask]}. A mismatch refuses the load; set to None to adapt a different base with this config."
        },
    )

    def __post_init__(self) -> None:
        strip_retype_guard(self)  # written by to_dict: no parameter targets
        super().__post_init__()

    def to_dict(self) -> dict:
        out = super().to_dict()
        digests = getattr(self, "_pp_digests", None)
        if digests:  # the injected adapter's own digests win over those the config was loaded with
            out["sparse_digests"] = digests
        return with_retype_guard(out, self.peft_type)  # stock LoraConfig refuses the file

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        import os

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            config._pp_source = os.fspath(path)
        return config


# ----------------------------------------------------------------------------------------------------- configs


def validate_lora_fields(config, method: str, inits: tuple = SAFE_INITS) -> None:
    """Refuse LoraConfig options whose semantics a sparsity-preserving update cannot keep (ValueError, named)."""
    import dataclasses

    def refuse(field: str, value, allowed: str) -> None:
        raise ValueError(f"{method}: {field}={value!r} is not supported (allowed: {allowed})")

    if getattr(config, "use_dora", False):
        refuse("use_dora", True, "False — DoRA rescales whole columns, which changes pruned weights")
    if getattr(config, "lora_bias", False):
        refuse("lora_bias", True, "False")
    if getattr(config, "use_qalora", False):
        refuse("use_qalora", True, "False")
    if getattr(config, "fan_in_fan_out", False):
        refuse("fan_in_fan_out", True, "False — only torch.nn.Linear layers are supported")
    if getattr(config, "target_parameters", None):
        refuse("target_parameters", config.target_parameters, "None — only nn.Linear modules can be targeted")
    init = config.init_lora_weights
    if not any(init is v or (isinstance(v, str) and init == v) for v in inits):
        refuse(
            "init_lora_weights",
            init,
            ", ".join(repr(v) for v in inits) + " — PiSSA/OLoRA/CorDA/LoftQ/EVA-style inits rewrite the base weights",
        )
    for f in dataclasses.fields(config):
        if f.name != "use_dora" and f.metadata.get("is_lora_variant") and getattr(config, f.name, None):
            refuse(f.name, getattr(config, f.name), "None/False — other LoRA variants cannot be combined")
    if not isinstance(config.require_sparsity, bool):
        refuse("require_sparsity", config.require_sparsity, "True, False")


def layer_mapping(plain: type, make_4bit, make_8bit) -> dict:
    """``_register_custom_module`` mapping; bitsandbytes classes first (they subclass ``nn.Linear``)."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    mapping: dict = {}
    if is_bnb_4bit_available():
        import bitsandbytes as bnb

        mapping[bnb.nn.Linear4bit] = make_4bit()
    if is_bnb_available():
        import bitsandbytes as bnb

        mapping[bnb.nn.Linear8bitLt] = make_8bit()
    mapping[nn.Linear] = plain
    return mapping
