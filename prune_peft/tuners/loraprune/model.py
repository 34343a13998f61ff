"""The LoRAPrune tuner: peft's LoraModel plus the block structure (GQA units, MLP channels) its masks live on.

Pruning units (methods.md §1, fixing aim-uofa/LoRAPrune#6 for grouped-query attention): with ``h`` query heads and
``g`` KV heads of size ``d``, unit ``u`` is KV head ``u`` together with its ``h/g`` query heads — rows
``[u·(h/g)·d, (u+1)·(h/g)·d)`` of q_proj, rows ``[u·d, (u+1)·d)`` of k_proj and v_proj, and the matching input
columns of o_proj (which see zeros there). Removing a unit whole keeps the query-per-KV ratio, so attention stays
exact and the compacted model runs with per-layer head counts. An MLP channel is a row of gate_proj and up_proj and
the matching column of down_proj.

The algorithm lives here too, as peft's AdaLoRA keeps its own: any training loop prunes with ::

    model.base_model.prepare_pruning(total_steps=num_steps)     # or LoRAPruneConfig(schedule_steps=...)
    for global_step, batch in enumerate(batches):
        model(**batch).loss.backward()
        model.base_model.update_importance(global_step)           # optional: score before the step (Trainer path)
        optimizer.step()
        model.base_model.update_and_allocate(global_step)         # scores (if not yet) + masks on the schedule
        optimizer.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ... import _hf
from ...sparsity.loraprune import n_pruned
from .._base import _remove_adapter_layers, _trainable_flags
from .._fsdp import check_base_for_adapters, shard_new_adapters
from .layer import LoRAPruneLayer, LoRAPruneLinear
from .pruner import LoRAPruner, check_sharding

__all__ = ["ATTN_ROLES", "MLP_ROLES", "LoRAPruneModel", "PruneBlock", "default_excluded_layers"]

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


def default_excluded_layers(num_layers: int) -> list[int]:
    """LoRAPrune's ``freeze()``: the first ⌊0.1·L⌋ blocks and the last one are never pruned."""
    return sorted(set(range(int(0.1 * num_layers))) | {num_layers - 1})


@dataclass
class PruneBlock:
    """One decoder block: its adapted role layers and the sizes of its pruning groups."""

    index: int
    name: str
    prunable: bool
    layers: dict[str, LoRAPruneLinear] = field(default_factory=dict)  # role -> layer (adapted ones only)
    head_dim: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    intermediate: int = 0

    @property
    def prunes_heads(self) -> bool:
        return self.num_kv_heads > 0

    @property
    def prunes_channels(self) -> bool:
        return self.intermediate > 0


def _check_sharded_base(model: nn.Module, config) -> str | None:
    """``"fsdp2"`` when get_peft_model was given a model FSDP2 already sharded in a layout the adapter can be sharded
    beside (``_fsdp.shard_new_adapters`` runs after the injection), None when unsharded; ValueError otherwise (FSDP1,
    ZeRO-3, 2-D meshes, a second adapter, a saved adapter loaded into shards: ``inference_mode=True``, which
    ``PeftModel.from_pretrained`` sets unless ``is_trainable=True``, or a config read from a saved folder). A structured
    config is also required: element masks need a global top-k over whole matrices (:func:`~.pruner.check_sharding`
    says the same at prepare_pruning)."""
    loading = bool(getattr(config, "inference_mode", False) or getattr(config, "_pp_saved", False))
    kind = check_base_for_adapters(model, "loraprune", loading=loading)
    if kind is not None and not config.structured:
        check_sharding(model, config.structured)  # raises: element-wise masks under FSDP2
    return kind


class LoRAPruneModel(LoraModel):
    """Creates LoRAPrune adapters; see :class:`~prune_peft.tuners.loraprune.LoRAPruneConfig`.

    Besides peft's API it exposes the pruning structure (:meth:`prune_blocks`, :meth:`get_masks`,
    :meth:`set_block_masks`, :meth:`element_layers`, :meth:`refresh_blocks`) and the algorithm, AdaLoRA-style:
    :meth:`prepare_pruning`, :meth:`update_importance`, :meth:`update_and_allocate` and :meth:`pruner` (whose
    ``state_dict()`` / ``load_state_dict()`` carry the moving average, schedule position and level).

    Example (a plain PyTorch loop; ``global_step`` = optimizer steps done before this one):

        ```py
        >>> model = get_peft_model(dense, LoRAPruneConfig(r=8, target_sparsity=0.5, schedule_steps=1000))
        >>> for global_step, batch in enumerate(loader):
        ...     model(**batch).loss.backward()
        ...     optimizer.step()
        ...     model.base_model.update_and_allocate(global_step)
        ...     optimizer.zero_grad()
        ```
    """

    method = "loraprune"

    # ------------------------------------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection and the block structure, all-or-nothing: a failure leaves ``model`` as it was.

        On a model FSDP2 already sharded (``fully_shard`` on the blocks and the model, 1-D mesh over all ranks) every
        adapted layer becomes its own FSDP2 unit right after the injection (``_fsdp.shard_new_adapters``: ``lora_B``'s
        rows split like the base rows the importance scores). FSDP1, ZeRO-3, other meshes, a second adapter or a saved
        adapter on a sharded model are refused before anything changes.
        """
        sharded = _check_sharded_base(model, self.peft_config[adapter_name])
        before = {id(m) for m in model.modules()}
        flags = _trainable_flags(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._pp_build(adapter_name)
            if sharded:  # after the masks exist (buffers, left whole)
                shard_new_adapters(model, "loraprune", adapter_name)
            self.__dict__.setdefault("_pp_pruners", {}).pop(adapter_name, None)
        except BaseException:
            self._pp_rollback(model, adapter_name, before, flags)
            raise

    def _pp_rollback(self, model: nn.Module, adapter_name: str, before: set[int], flags=None) -> None:
        only = set(self.peft_config) <= {adapter_name}
        # any peft tuner layer: on a Conv1D (GPT-2) peft wraps with its own lora.Linear, not LoRAPruneLinear
        _remove_adapter_layers(model, adapter_name, before, everything=only, layer_cls=BaseTunerLayer, flags=flags)
        self.peft_config.pop(adapter_name, None)
        if only and hasattr(model, "peft_config"):
            del model.peft_config

    def _pp_build(self, adapter: str, check: bool = True) -> None:
        """Find the blocks, check the structure can be expressed (``check``), create all-kept masks."""
        config = self.peft_config[adapter]
        try:
            blocks_name, blocks = _hf.find_decoder_blocks(self.model)
        except ValueError as exc:
            raise ValueError(f"loraprune: {exc}") from None
        n = len(blocks)
        excluded = default_excluded_layers(n) if config.exclude_layers is None else list(config.exclude_layers)
        bad = [i for i in excluded if not -n <= i < n]
        if bad:
            raise ValueError(f"loraprune: exclude_layers {bad} are out of range for a model with {n} decoder blocks")
        excluded = {i % n for i in excluded}
        size = _hf.head_dim(self.model)
        result = []
        for i, block in enumerate(blocks):
            info = PruneBlock(index=i, name=f"{blocks_name}.{i}", prunable=i not in excluded)
            for name, module in block.named_modules():
                role = name.rpartition(".")[2]
                if isinstance(module, LoRAPruneLayer) and adapter in module.lora_A and role in ATTN_ROLES + MLP_ROLES:
                    info.layers[role] = module
            if info.prunable and config.structured:
                self._pp_structure(info, block, config, size, check)
            result.append(info)
        prunable = [b for b in result if b.prunable]
        if not prunable:
            raise ValueError(
                f"loraprune: exclude_layers={sorted(excluded)} leaves none of the {n} decoder blocks to prune"
            )
        if config.structured:
            for info in prunable:
                for role in ("q_proj", "k_proj", "v_proj") if info.prunes_heads else ():
                    info.layers[role].init_prune_mask(adapter, "rows")
                for role in ("gate_proj", "up_proj") if info.prunes_channels else ():
                    info.layers[role].init_prune_mask(adapter, "rows")
        else:
            found = 0
            for info in prunable:
                for name, module in blocks[info.index].named_modules():
                    if isinstance(module, LoRAPruneLayer) and adapter in module.lora_A:
                        if config.nm is not None and module.in_features % config.nm.m:
                            raise ValueError(
                                f"loraprune: structure={config.structure!r} needs in_features divisible by "
                                f"{config.nm.m}; {info.name}.{name} has {module.in_features}"
                            )
                        module.init_prune_mask(adapter, "elements")
                        found += 1
            if not found:
                raise ValueError("loraprune: no adapted linear layer inside the prunable decoder blocks")
        self.__dict__.setdefault("_pp_blocks", {})[adapter] = result

    @staticmethod
    def _pp_structure(info: PruneBlock, block: nn.Module, config, head_dim: int, check: bool = True) -> None:
        """Check that the block can express ``config.structure``; fill in its group sizes (ValueError otherwise)."""
        want_heads = config.structure in ("head+channel", "head")
        want_channels = config.structure in ("head+channel", "channel")
        names = {name.rpartition(".")[2] for name, _ in block.named_modules()}
        p = config.target_sparsity
        if want_heads:
            missing = [r for r in ("q_proj", "k_proj", "v_proj") if r not in info.layers]
            if missing:
                absent = [r for r in missing if r not in names]
                why = (
                    f"the block has no {absent} modules (fused or unknown attention projections)"
                    if absent
                    else f"{missing} are not adapted (add them to target_modules)"
                )
                raise ValueError(
                    f"loraprune: structure={config.structure!r} cannot be expressed on {info.name}: head pruning "
                    f"needs adapted q_proj, k_proj and v_proj; {why}. Use structure='channel' or 'unstructured'."
                )
            q, k, v = (info.layers[r] for r in ("q_proj", "k_proj", "v_proj"))
            if k.out_features % head_dim or q.out_features % head_dim or v.out_features != k.out_features:
                raise ValueError(
                    f"loraprune: {info.name}: q/k/v widths {q.out_features}/{k.out_features}/{v.out_features} "
                    f"are not whole heads of head_dim={head_dim}"
                )
            info.head_dim = head_dim
            info.num_heads = q.out_features // head_dim
            info.num_kv_heads = k.out_features // head_dim
            if info.num_heads % info.num_kv_heads:
                raise ValueError(
                    f"loraprune: {info.name}: {info.num_heads} query heads do not group onto {info.num_kv_heads} "
                    "KV heads"
                )
            if check and n_pruned(p, info.num_kv_heads) >= info.num_kv_heads:
                raise ValueError(
                    f"loraprune: target_sparsity={p} would remove every head of {info.name} (it has "
                    f"{info.num_kv_heads} KV head(s), each pruned together with its query heads; the count rounds "
                    f"to {info.num_kv_heads}). Lower target_sparsity, use structure='channel', or exclude the block."
                )
        if want_channels:
            missing = [r for r in ("gate_proj", "up_proj") if r not in info.layers]
            if missing:
                absent = [r for r in missing if r not in names]
                why = f"the block has no {absent} modules" if absent else f"{missing} are not adapted"
                raise ValueError(
                    f"loraprune: structure={config.structure!r} cannot be expressed on {info.name}: channel "
                    f"pruning needs adapted gate_proj and up_proj (a gated MLP); {why}. Use structure='head' or "
                    "'unstructured'."
                )
            gate, up = info.layers["gate_proj"], info.layers["up_proj"]
            if gate.out_features != up.out_features:
                raise ValueError(f"loraprune: {info.name}: gate_proj and up_proj widths differ")
            info.intermediate = gate.out_features
            if config.uniform and config.channel_multiple >= info.intermediate:  # kept count rounds to the full width
                raise ValueError(
                    f"loraprune: channel_multiple={config.channel_multiple} is not smaller than the MLP width "
                    f"{info.intermediate} of {info.name}: uniform=True rounds the kept channels to a multiple of it, "
                    "so no channel could ever be pruned. Pass a channel_multiple below the width (a divisor of it)."
                )
            if check and n_pruned(p, info.intermediate) >= info.intermediate:
                raise ValueError(f"loraprune: target_sparsity={p} would remove every MLP channel of {info.name}")

    # ------------------------------------------------------------------------------------------------- access

    def prune_blocks(self, adapter: str = "default") -> list[PruneBlock]:
        """Every decoder block with its adapted layers and group sizes (``prunable`` marks the pruned ones)."""
        blocks = self.__dict__.get("_pp_blocks", {})
        if adapter not in blocks:
            raise ValueError(f"loraprune: no adapter {adapter!r}")
        return blocks[adapter]

    def get_masks(self, adapter: str = "default") -> dict[int, dict[str, torch.Tensor]]:
        """``{block index: {"units": bool[num_kv_heads], "channels": bool[intermediate]}}`` for prunable blocks.

        Units are read from k_proj's row mask (one flag per KV head), channels from gate_proj's.
        """
        out = {}
        for info in self.prune_blocks(adapter):
            if not info.prunable:
                continue
            entry = {}
            if info.prunes_heads:
                rows = info.layers["k_proj"].row_mask(adapter)
                entry["units"] = rows.reshape(info.num_kv_heads, info.head_dim).all(-1).cpu()
            if info.prunes_channels:
                entry["channels"] = info.layers["gate_proj"].row_mask(adapter).clone().cpu()
            if entry:
                out[info.index] = entry
        return out

    def set_block_masks(
        self,
        index: int,
        units: torch.Tensor | None = None,
        channels: torch.Tensor | None = None,
        adapter: str = "default",
    ) -> None:
        """Write a block's unit mask (bool [num_kv_heads]) and/or channel mask (bool [intermediate])."""
        info = self.prune_blocks(adapter)[index]
        if not info.prunable:
            raise ValueError(f"loraprune: block {index} is excluded from pruning")
        if units is not None:
            units = torch.as_tensor(units, dtype=torch.bool).cpu()
            if units.shape != (info.num_kv_heads,) or not info.prunes_heads:
                raise ValueError(f"units must be a bool vector of {info.num_kv_heads} KV heads for block {index}")
            if not bool(units.any()):
                raise ValueError(f"units would remove every head of block {index}")
            group = info.num_heads // info.num_kv_heads
            info.layers["q_proj"].set_row_mask(adapter, units.repeat_interleave(group * info.head_dim))
            for role in ("k_proj", "v_proj"):
                info.layers[role].set_row_mask(adapter, units.repeat_interleave(info.head_dim))
        if channels is not None:
            channels = torch.as_tensor(channels, dtype=torch.bool).cpu()
            if channels.shape != (info.intermediate,) or not info.prunes_channels:
                raise ValueError(f"channels must be a bool vector of {info.intermediate} for block {index}")
            for role in ("gate_proj", "up_proj"):
                info.layers[role].set_row_mask(adapter, channels)

    def refresh_blocks(self, adapter: str | None = None) -> None:
        """Re-read the decoder blocks after their shapes changed (``compact``); every remaining group is kept.

        Structured adapters only (``adapter=None``: all of them); a prepared pruner is dropped, since its block sizes
        and importance vectors no longer match.
        """
        for name in [adapter] if adapter is not None else list(self.peft_config):
            if self.peft_config[name].structured:
                self._pp_build(name, check=False)
                self.__dict__.get("_pp_pruners", {}).pop(name, None)

    def element_layers(self, adapter: str = "default") -> dict[str, LoRAPruneLinear]:
        """``{module name: layer}`` of the layers carrying element-wise masks (unstructured / N:M)."""
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, LoRAPruneLayer) and m.element_mask(adapter) is not None
        }

    # ------------------------------------------------------------------------------------------------ algorithm

    def prepare_pruning(self, total_steps: int | None = None, adapter: str | None = None, **overrides: Any) -> None:
        """Validate the schedule for a run of ``total_steps`` optimizer steps and (re)start the adapter's pruner.

        ``total_steps`` is the run's length (``PruneCallback`` passes the Trainer's ``max_steps``); the schedule
        spans ``config.schedule_steps`` when set (it must fit: ValueError otherwise), else ``total_steps``; one of
        the two is required. ``overrides`` replace config settings for this run (``target_sparsity``, ``warmup``,
        ``cooldown``, ``prune_every``, ``schedule``, ``schedule_steps``, ``initial_sparsity``, ``importance``,
        ``importance_beta``) without touching the saved config. Raises ValueError before anything changes.
        ``adapter=None``: the active adapter(s).
        """
        names = self._adapter_names(adapter)
        pruners = [LoRAPruner(self, name, total_steps, **overrides) for name in names]
        self.__dict__.setdefault("_pp_pruners", {}).update({p.adapter: p for p in pruners})

    def pruner(self, adapter: str | None = None) -> LoRAPruner:
        """The adapter's :class:`LoRAPruner` (``importance``, ``schedule``, ``state_dict()`` / ``load_state_dict()``);
        prepared from the config (``schedule_steps``) on first use. ``adapter=None``: the active adapter."""
        name = self._adapter_names(adapter)[0]
        store = self.__dict__.setdefault("_pp_pruners", {})
        if name not in store:
            self.prepare_pruning(adapter=name)
        return store[name]

    def _adapter_names(self, adapter: str | None) -> list[str]:
        names = [adapter] if adapter is not None else [a for a in self.active_adapters if a in self.peft_config]
        for name in names:
            self.prune_blocks(name)  # ValueError for an unknown adapter
        return names

    def _pruners(self, adapter: str | None) -> list[LoRAPruner]:
        return [self.pruner(name) for name in self._adapter_names(adapter)]

    def update_importance(self, global_step: int, adapter: str | None = None) -> None:
        """Add the LoRA gradients present now to the moving-average importance (once per optimizer step).

        Call it after ``loss.backward()`` (and gradient clipping) and before ``optimizer.step()`` to score the
        weights the gradients belong to — this is what ``PruneCallback`` does, in ``on_pre_optimizer_step``. Without
        it, :meth:`update_and_allocate` scores the same gradients against the just-updated LoRA weights.
        With ``importance="grad"`` it is required (``update_and_allocate`` raises otherwise): it drops the base
        gradients once scored, so the optimizer step cannot update the base weights.
        """
        for pruner in self._pruners(adapter):
            pruner.update_importance(global_step)

    def update_and_allocate(self, global_step: int, adapter: str | None = None) -> None:
        """One optimizer step of LoRAPrune, in peft's AdaLoRA order (after ``optimizer.step()``, before
        ``optimizer.zero_grad()``): score the gradients still present (unless :meth:`update_importance` already did
        for this step), then, on a schedule event, prune the lowest-scoring groups. ``global_step`` is the number of
        optimizer steps completed before this one (0 first). ``PruneCallback`` calls it in ``on_optimizer_step``.
        """
        for pruner in self._pruners(adapter):
            pruner.update_and_allocate(global_step)

    # ------------------------------------------------------------------------------------------------ unloading

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """peft's merge; the returned model carries ``prune_peft_masks`` (the block masks) for :func:`compact`."""
        active = self.active_adapters[0] if self.active_adapters else "default"
        masks = self.get_masks(active) if self.peft_config[active].structured else None
        meta = self._pp_meta(active)
        model = super().merge_and_unload(*args, **kwargs)
        if masks is not None:
            model.prune_peft_masks = masks
            model.prune_peft_meta = meta
        return model

    def _pp_meta(self, adapter: str) -> dict:
        return {
            info.index: {"head_dim": info.head_dim, "num_heads": info.num_heads, "num_kv_heads": info.num_kv_heads}
            for info in self.prune_blocks(adapter)
            if info.prunable and info.prunes_heads
        }
