"""LoRAPrune's algorithm for one adapter: moving-average importance, the schedule, and the masks it decides.

A :class:`LoRAPruner` belongs to a :class:`~prune_peft.tuners.loraprune.LoRAPruneModel` (``tuner.pruner(adapter)``)
and is driven by the tuner's ``update_importance(global_step)`` / ``update_and_allocate(global_step)``, like peft's
AdaLoRA. ``global_step`` counts the optimizer steps completed *before* the current one (0 for the first), as in
peft's AdaLoRA loop and the Trainer's ``state.global_step`` at its optimizer-step events; the schedule's step is
``t = global_step + 1``.

The pure tensor math lives in :mod:`prune_peft.sparsity.loraprune`; this module only decides which scores feed which
mask and when. Nothing here knows about the Trainer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ... import _dist
from ...sparsity.loraprune import (
    channel_scores,
    grad_importance,
    lora_importance,
    moving_average,
    n_pruned,
    normalize_scores,
    prune_lowest,
)
from ...sparsity.masks import gqa_unit_scores
from ...sparsity.schedules import SCHEDULE_KEYS, PruneSchedule
from .config import IMPORTANCE, check_importance_beta

__all__ = [
    "OVERRIDABLE",
    "LoRAPruner",
    "broadcast_masks",
    "check_not_sharded",
    "check_sharding",
    "dense_weight",
    "uniform_kept",
]

# settings a run may override without changing the adapter (the structure is fixed when the adapter is created)
OVERRIDABLE = (*SCHEDULE_KEYS, "importance_beta", "importance")


# -------------------------------------------------------------------------------------------------- distributed


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_masks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's boolean masks on every rank (identity in a single process).

    Decisions are already deterministic (stable sort on all-reduced gradients); the broadcast makes rank agreement
    hold even when floating-point reductions differ in the last bit.
    """
    if _world_size() <= 1 or not masks:
        return masks
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks])
    torch.distributed.broadcast(flat, src=0)
    out, offset = [], 0
    for m in masks:
        out.append(flat[offset : offset + m.numel()].reshape(m.shape).bool().to(m.device))
        offset += m.numel()
    return out


def check_not_sharded(model: nn.Module, owner: str = "loraprune") -> None:
    """ValueError when ``model``'s parameters are sharded (FSDP 1/2, DeepSpeed ZeRO-3): the importance needs them whole."""
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (torch ≥ 2.6)

        kinds.append(FSDPModule)
    except ImportError:
        pass
    sharded = any(isinstance(m, tuple(kinds)) for m in model.modules()) if kinds else False
    sharded = sharded or any(
        hasattr(p, "ds_numel") or type(p).__name__ in ("DTensor", "FlatParameter") or getattr(p, "_is_sharded", False)
        for p in model.parameters()
    )
    if sharded:
        raise ValueError(
            f"{owner}: parameters are sharded (FSDP or DeepSpeed ZeRO-3). LoRA-guided importance needs whole "
            "LoRA factors, gradients and base weights on every rank; train with DDP (or ZeRO ≤ 2 / single GPU). "
            "See docs/loraprune.md, 'Distributed training'."
        )


SUPPORTED_SHARDING = (
    "supported: DDP, one device, or FSDP2 (torch's fully_shard / accelerate fsdp_version: 2) on a 1-D mesh over all "
    "ranks, applied before or after get_peft_model, with a structured LoRAPruneConfig (structure 'head+channel', 'head' or "
    "'channel') and importance 'lora' or 'magnitude'"
)


def check_sharding(
    model: nn.Module, structured: bool = True, importance: str = "lora", owner: str = "loraprune"
) -> None:
    """ValueError for a sharded layout LoRAPrune cannot score exactly; FSDP2 row shards of a structured adapter pass.

    Under FSDP2 every parameter is a dim-0 shard: the importance reads the local rows of each base weight, gathers
    only the small LoRA factor ``A`` and its gradient, and all-reduces row/column score vectors. FSDP1 flattens base
    and adapter into one FlatParameter and DeepSpeed ZeRO-3 partitions a flat buffer (neither exposes rows); element
    masks (unstructured / N:M) need a global top-k over whole matrices; ``importance="grad"`` needs base-weight
    gradients that FSDP2 would have to reduce-scatter for a frozen weight.
    """
    kind = _dist.sharding_kind(model)
    if kind is None:
        return
    if kind in ("fsdp1", "zero3"):
        what = "FSDP1 (FlatParameter)" if kind == "fsdp1" else "DeepSpeed ZeRO-3 (partitioned parameters)"
        raise ValueError(
            f"{owner}: parameters are sharded by {what}, which flattens base and adapter weights so the LoRA-guided "
            f"importance cannot read the base rows it scores; {SUPPORTED_SHARDING}. See docs/distributed.md."
        )
    _dist.refuse_sharded_bnb(model, owner)  # the plain-loop path: PruneCallback's check is not on it
    if not structured:
        raise ValueError(
            f"{owner}: element-wise masks (structure 'unstructured' / N:M) under FSDP2 need a global top-k over whole "
            f"d_out×d_in importance matrices, which sharding splits across ranks; {SUPPORTED_SHARDING}."
        )
    if importance == "grad":
        raise ValueError(
            f"{owner}: importance='grad' under FSDP2 needs gradients of the frozen base weights, which FSDP2 does "
            f"not reduce; {SUPPORTED_SHARDING}."
        )
    issue = _dist.unsupported_shard(model)  # the mesh, then the placement (local_rows), of every DTensor
    if issue is None:
        return
    name, mesh = issue.name, issue.mesh
    if issue.kind == "mesh":
        raise ValueError(
            f"{owner}: {name} is sharded on a {mesh.ndim}-D mesh of {mesh.size()} ranks (world size "
            f"{_dist.world_size()}, e.g. HSDP): the score vectors are reduced over all ranks, so replicas would be "
            f"counted twice; {SUPPORTED_SHARDING}."
        )
    raise ValueError(f"{owner}: {name} is {issue.reason}; {SUPPORTED_SHARDING}.")


# ---------------------------------------------------------------------------------------------------- the pruner


class LoRAPruner:
    """Importance, schedule and mask decisions of one LoRAPrune adapter (built by ``tuner.prepare_pruning``).

    Attributes:
        settings: the config's schedule/importance settings with the run's overrides.
        schedule: the :class:`~prune_peft.sparsity.schedules.PruneSchedule` over the run.
        importance: moving averages — ``"u<i>"`` / ``"c<i>"`` (units / channels of block i) or module names.
        last_step, level: schedule step and sparsity of the last mask update.
    """

    def __init__(self, tuner, adapter: str, total_steps: int | None = None, **overrides: Any) -> None:
        config = tuner.peft_config[adapter]
        if "structure" in overrides:
            raise ValueError("loraprune: structure is fixed when the adapter is created (LoRAPruneConfig.structure)")
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(f"loraprune: unknown setting(s) {unknown}; allowed: {list(OVERRIDABLE)}")
        self.tuner, self.adapter, self.config = tuner, adapter, config
        self.settings: dict[str, Any] = {k: getattr(config, k) for k in OVERRIDABLE}
        self.settings.update({k: v for k, v in overrides.items() if v is not None})
        s = self.settings
        if config.nm is not None and abs(s["target_sparsity"] - config.nm.sparsity) > 1e-9:
            raise ValueError(
                f"loraprune: target_sparsity={s['target_sparsity']} contradicts structure={config.structure!r}"
            )
        if total_steps is None and s["schedule_steps"] is None:
            raise ValueError(
                "loraprune: the pruning schedule needs its length in optimizer steps: set "
                "LoRAPruneConfig(schedule_steps=...) or call model.base_model.prepare_pruning(total_steps=...) before "
                "the first update (PruneCallback passes the Trainer's max_steps)"
            )
        try:
            self.schedule = PruneSchedule.from_settings(s, total_steps, "loraprune")
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith("loraprune") else f"loraprune: {msg}") from None
        if s["importance"] not in IMPORTANCE:
            raise ValueError(f"loraprune: importance must be one of {list(IMPORTANCE)}, got {s['importance']!r}")
        check_importance_beta(s["importance_beta"])
        check_sharding(tuner, config.structured, s["importance"])
        self.blocks = [b for b in tuner.prune_blocks(adapter) if b.prunable]
        self.elements: dict[str, nn.Module] = {}
        p = s["target_sparsity"]
        if config.structured:
            for b in self.blocks:
                if b.prunes_heads and n_pruned(p, b.num_kv_heads) >= b.num_kv_heads:
                    raise ValueError(f"loraprune: target_sparsity={p} would remove every head of {b.name}")
                if b.prunes_channels and n_pruned(p, b.intermediate) >= b.intermediate:
                    raise ValueError(f"loraprune: target_sparsity={p} would remove every channel of {b.name}")
        else:
            self.elements = tuner.element_layers(adapter)
        # importance="grad": base weights this pruner made require grad (re-frozen when pruning is over); inherited
        # from the adapter's previous pruner so a re-prepared run still knows which ones were frozen originally
        previous = tuner.__dict__.get("_pp_pruners", {}).get(adapter)
        self._unfrozen: list[nn.Parameter] = list(previous._unfrozen) if previous is not None else []
        if s["importance"] == "grad":
            self._unfreeze_bases()
        elif self._unfrozen:
            self._refreeze_bases()
        self.importance: dict[str, torch.Tensor] = {}
        self.skipped_updates = 0  # optimizer steps whose importance update was skipped (a non-finite score)
        self.last_step = 0
        self.level = 0.0
        self._scored_step = 0  # schedule step whose gradients are already in the moving average

    # ------------------------------------------------------------------------------------- importance="grad"

    def _unfreeze_bases(self) -> None:
        """Let the scored base weights receive ``.grad`` (the reference's ``unfreeze``, called after the optimizer
        is built). The pruner drops every base gradient right after scoring it (:meth:`update_importance`, before
        ``optimizer.step()``), so no optimizer ever updates the base, even one that holds the weight."""
        quantized = [n for n, m in self._layers() if _quantized(m.get_base_layer().weight)]
        if quantized:
            raise ValueError(
                f"loraprune: importance='grad' needs float base weights that can hold a gradient; {quantized[0]} "
                "is quantized (bitsandbytes). Use importance='lora' (the default) or load the base in bf16/fp16."
            )
        for _, layer in self._layers():
            W = layer.get_base_layer().weight
            if not W.requires_grad:
                W.requires_grad_(True)
                self._unfrozen.append(W)

    def _refreeze_bases(self) -> None:
        for W in self._unfrozen:
            W.grad = None
            W.requires_grad_(False)
        self._unfrozen = []

    def _drop_base_grads(self) -> None:
        for _, layer in self._layers():
            layer.get_base_layer().weight.grad = None

    def _layers(self):
        if self.config.structured:
            for b in self.blocks:
                for role, layer in b.layers.items():
                    yield f"{b.name}.{role}", layer
        else:
            yield from self.elements.items()

    # ---------------------------------------------------------------------------------------------- importance

    def _factors(self, layer):
        """``(W, A, B, s, mode)`` of one layer (W de-quantized when the base is bitsandbytes); ``None`` when the
        configured metric's gradients are missing."""
        a = self.adapter
        W = layer.get_base_layer().weight
        A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
        mode = self.settings["importance"]
        missing = (A.grad is None or B.grad is None) if mode == "lora" else mode == "grad" and W.grad is None
        return None if missing else (layer.dense_base_weight(), A, B, s, mode)  # bnb: transient de-quantized

    def _base_grad(self, layer) -> torch.Tensor:
        return layer.get_base_layer().weight.grad

    def _importance(self, layer) -> torch.Tensor | None:
        """Element importance of one layer under the configured metric (None when its gradients are missing)."""
        if (factors := self._factors(layer)) is None:
            return None
        W, A, B, s, mode = factors
        if mode == "lora":
            return lora_importance(W, A, B, A.grad, B.grad, s)
        if mode == "grad":
            return grad_importance(W, self._base_grad(layer), A, B, s)
        return torch.addmm(W.detach().float(), B.detach().float(), A.detach().float(), alpha=s).abs_()

    def _channel_scores(self, layer, axis: str, factors=None, gathered=None) -> torch.Tensor | None:
        """Row (``"out"``) or column (``"in"``) sums of one layer's importance; None when its gradients are missing.

        Under FSDP2 (DTensor parameters sharded on rows) this rank scores only its rows of the base weight: the small
        ``A`` and ``∂L/∂A`` are gathered whole (``gathered``: already gathered, in one collective for every layer),
        ``B``'s rows are the base's rows. ``"out"`` returns the whole d_out vector with zeros outside the local rows
        and ``"in"`` this rank's partial column sums, so one sum over ranks (:meth:`_structured_scores`) gives the
        single-process vector.
        """
        if factors is None and (factors := self._factors(layer)) is None:
            return None
        W, A, B, s, mode = factors
        if not _dist.is_sharded(W):
            if mode == "lora":
                return channel_scores(W, A, B, s, grad_A=A.grad, grad_B=B.grad, axis=axis)
            if mode == "grad":
                return channel_scores(W, A, B, s, grad_W=self._base_grad(layer), axis=axis)
            return channel_scores(W, A, B, s, axis=axis)
        rows = self._local_rows(layer, W, B)
        if gathered is None:
            gathered = (_dist.full(A.detach()), _dist.full(A.grad) if mode == "lora" else None)
        Af, gAf = gathered
        Bl = _dist.local(B.detach())
        # "magnitude" needs no gradients ("grad" is refused under FSDP2 by check_sharding)
        grads = {"grad_A": gAf, "grad_B": _dist.local(B.grad)} if mode == "lora" else {}
        score = channel_scores(_dist.local(W), Af, Bl, s, axis=axis, **grads)
        if axis == "in":
            return score
        whole = torch.zeros(W.shape[0], dtype=score.dtype, device=score.device)
        whole[rows[0] : rows[1]] = score
        return whole

    def _local_rows(self, layer, W, B) -> tuple[int, int]:
        """This rank's rows of ``W`` (cached per layer); ValueError when ``B``'s shard holds other rows."""
        cache = self.__dict__.setdefault("_rows", {})
        key = id(layer)
        if key not in cache:
            rows = _dist.local_rows(W)
            if _dist.local_rows(B) != rows:
                raise ValueError(
                    f"loraprune: the base weight and lora_B of a layer are sharded on different rows ({rows} vs "
                    f"{_dist.local_rows(B)}); {SUPPORTED_SHARDING}."
                )
            cache[key] = rows
        return cache[key]

    _UNIT_ROLES = (("q_proj", "out"), ("k_proj", "out"), ("v_proj", "out"), ("o_proj", "in"))
    _CHANNEL_ROLES = (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in"))

    def _structured_scores(self) -> dict[str, torch.Tensor]:
        """This step's block scores ``{"u<i>": units, "c<i>": channels}``: every module's row/column sums, one sum
        over ranks when sharded (a single all-reduce of the concatenated vectors), then the per-module L2
        normalisation and the per-block sum, as in the reference."""
        jobs = []  # (key, block, layer, axis, factors) of every layer with its gradients present
        for b in self.blocks:
            for key, roles, wanted in (
                ("u", self._UNIT_ROLES, b.prunes_heads),
                ("c", self._CHANNEL_ROLES, b.prunes_channels),
            ):
                if not wanted:
                    continue
                for role, axis in roles:
                    layer = b.layers.get(role)
                    factors = self._factors(layer) if layer is not None else None
                    if factors is not None:
                        jobs.append((f"{key}{b.index}", b, layer, axis, factors))
        gathered = [None] * len(jobs)
        if jobs and self._sharded():  # every A (and ∂L/∂A) of the step in one all-gather
            lora = self.settings["importance"] == "lora"
            small = [f[1].detach() for *_, f in jobs] + ([f[1].grad for *_, f in jobs] if lora else [])
            whole = _dist.full_many(small)
            n = len(jobs)
            gathered = [(whole[i], whole[n + i] if lora else None) for i in range(n)]
        parts = [
            (key, b, self._channel_scores(layer, axis, factors, g))
            for (key, b, layer, axis, factors), g in zip(jobs, gathered)
        ]
        if parts and self._sharded():
            flat = _dist.all_reduce_sum(torch.cat([v for _, _, v in parts]))
            parts = [(k, b, v) for (k, b, _), v in zip(parts, flat.split([v.numel() for _, _, v in parts]))]
        grouped: dict[str, list[torch.Tensor]] = {}
        for key, b, score in parts:
            if key[0] == "u":
                score = gqa_unit_scores(score, b.num_kv_heads, head_dim=b.head_dim)
            grouped.setdefault(key, []).append(normalize_scores(score))
        return {k: torch.stack(v).sum(0) for k, v in grouped.items()}

    def _sharded(self) -> bool:
        """Whether the scored base weights are FSDP2 shards (checked once, on the first scored layer)."""
        if "_is_sharded" not in self.__dict__:
            layer = next((layer for _, layer in self._layers()), None)
            sharded = layer is not None and _dist.is_sharded(layer.get_base_layer().weight)
            if sharded:  # sharded after prepare_pruning: check the layout now, before any collective
                check_sharding(self.tuner, self.config.structured, self.settings["importance"])
            self._is_sharded = sharded
        return self._is_sharded

    @torch.no_grad()
    def update_importance(self, global_step: int) -> None:
        """Add the gradients present now to the moving average (no-op after the last event: it would be unused).

        As the reference's ``update_sensitivity_dict``: Ī starts at zero, and when any new score of the step is
        NaN/inf the whole step's update is skipped (every block keeps its old Ī; counted in ``skipped_updates``).
        With ``importance="grad"`` the base gradients are dropped (``W.grad = None``) once scored, so the optimizer
        step that follows cannot update the base; after the last pruning event the bases are frozen again.
        """
        step = _step(global_step)
        grad_mode = self.settings["importance"] == "grad"
        try:
            if step <= self.schedule.final_step:
                self._accumulate()
        finally:
            if grad_mode:
                self._drop_base_grads()
        if grad_mode and step >= self.schedule.final_step:
            self._refreeze_bases()  # the masks are final: no more base gradients are needed
        self._scored_step = step

    def _accumulate(self) -> None:
        beta = self.settings["importance_beta"]
        if self.config.structured:
            self._sharded()  # the layout check happens before any scoring
            new = self._structured_scores()
        else:  # element-wise: the new averages are formed first, so a skipped step leaves every old one untouched
            new = {}
            for name, layer in self.elements.items():
                imp = self._importance(layer)
                if imp is not None:
                    if not bool(torch.isfinite(imp).all()):
                        self._skip()
                        return
                    new[name] = moving_average(self.importance.get(name), imp, beta)
        if not new and self.settings["importance"] != "magnitude":
            raise RuntimeError(
                "loraprune: no LoRA gradients were present when the importance was updated; call it after "
                "loss.backward() and before optimizer.zero_grad(). (DeepSpeed ZeRO ≥ 2 keeps gradients out of "
                ".grad; see docs/loraprune.md.)"
            )
        if self.config.structured and new:
            keys, values = list(new), list(new.values())
            # one host sync per step: every block's new score must be finite, else the step is skipped for all
            if not bool(torch.isfinite(torch.cat(values)).all()):
                self._skip()
                return
            new = _moving_averages([self.importance.get(k) for k in keys], values, beta, keys)
        self.importance.update(new)

    def _skip(self) -> None:
        self.skipped_updates += 1
        warnings.warn(
            "loraprune: a non-finite importance score (NaN/inf gradients); this step's importance update was skipped "
            "for every block, as in the reference",
            RuntimeWarning,
            stacklevel=3,
        )

    # ---------------------------------------------------------------------------------------------------- masks

    @torch.no_grad()
    def update_and_allocate(self, global_step: int) -> None:
        """Score this step's gradients unless :meth:`update_importance` already did; on a schedule event, prune."""
        step = _step(global_step)
        if step != self._scored_step:
            if self.settings["importance"] == "grad" and step <= self.schedule.final_step:
                self._drop_base_grads()
                raise RuntimeError(
                    "loraprune: importance='grad' must be scored before optimizer.step(): call "
                    "model.base_model.update_importance(global_step) after loss.backward() (PruneCallback does, in "
                    "on_pre_optimizer_step). It drops the base gradients once scored, so the optimizer cannot update "
                    "the base weights; scoring after the step would let an optimizer that holds them train the base."
                )
            self.update_importance(global_step)
        if not self.schedule.is_event(step) or step <= self.last_step:
            return
        p = self.schedule.sparsity(step)
        if self.config.structured:
            self._update_structured(p)
        else:
            self._update_elements(p)
        self.last_step, self.level = step, p

    def _update_structured(self, p: float) -> None:
        current = self.tuner.get_masks(self.adapter)
        cpu = _to_cpu(self.importance)  # the decisions run on CPU (the masks' home): one transfer, not one per block
        new: list[tuple[int, str, torch.Tensor]] = []
        for b in self.blocks:
            for kind, key, n_groups in (
                ("units", f"u{b.index}", b.num_kv_heads),
                ("channels", f"c{b.index}", b.intermediate),
            ):
                if kind not in current.get(b.index, {}):
                    continue
                mask = current[b.index][kind]
                scores = cpu.get(key)
                if scores is None:
                    scores = torch.zeros(n_groups)
                new.append((b.index, kind, prune_lowest(scores, mask, self._n_cut(p, kind, n_groups))))
        masks = broadcast_masks([m for _, _, m in new])
        for (index, kind, _), mask in zip(new, masks):
            self.tuner.set_block_masks(index, adapter=self.adapter, **{kind: mask})

    def _n_cut(self, p: float, kind: str, n_groups: int) -> int:
        """Groups to remove from one block at level ``p``; ``uniform=True`` rounds kept channels to a multiple.

        The count depends only on the block's size, so equal-size blocks keep equal counts (a stock config);
        which groups go is chosen per block from its own importance.
        """
        cut = n_pruned(p, n_groups)
        if kind == "channels" and getattr(self.config, "uniform", False):
            cut = n_groups - uniform_kept(n_groups - cut, n_groups, self.config.channel_multiple)
        return cut

    def _update_elements(self, p: float) -> None:
        nm = self.config.nm
        names, masks = [], []
        for name, layer in self.elements.items():
            mask = layer.element_mask(self.adapter)
            scores = self.importance.get(name)
            if scores is None:
                scores = torch.zeros(mask.shape)
            scores = scores.to(mask.device)
            if nm is None:
                new = prune_lowest(scores.reshape(-1), mask.reshape(-1), n_pruned(p, mask.numel())).reshape(mask.shape)
            else:  # progressive N:M: k of every M removed, k → M − N at the target
                k = n_pruned(p / nm.sparsity if nm.sparsity else 0.0, nm.m - nm.n)
                new = prune_lowest(scores.reshape(-1, nm.m), mask.reshape(-1, nm.m), k).reshape(mask.shape)
            names.append(name)
            masks.append(new)
        for name, mask in zip(names, broadcast_masks(masks)):
            self.elements[name].set_element_mask(self.adapter, mask)

    # -------------------------------------------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, float]:
        """``prune/…`` metrics: target level, sparsity per kind (heads, channels, parameters) and importance stats."""
        pre = "prune/"
        out: dict[str, float] = {pre + "target_sparsity": float(self.level)}
        if self.config.structured:
            self._structured_metrics(out)
        else:
            kept: dict[str, list[int]] = {}
            for name, layer in self.elements.items():
                mask = layer.element_mask(self.adapter)
                k = kept.setdefault(name.rpartition(".")[2], [0, 0])
                k[0] += int(mask.sum())
                k[1] += mask.numel()
            for role, (k, n) in sorted(kept.items()):
                out[f"{pre}sparsity/{role}"] = 1 - k / n
            total_k = sum(v[0] for v in kept.values())
            total_n = sum(v[1] for v in kept.values())
            out[pre + "sparsity"] = 1 - total_k / max(total_n, 1)
        values = list(self.importance.values())
        if values:
            out[pre + "importance_mean"] = float(torch.stack([v.float().mean() for v in values]).mean())
            out[pre + "importance_max"] = float(max(float(v.max()) for v in values))
            out[pre + "importance_min"] = float(min(float(v.min()) for v in values))
        return out

    def _structured_metrics(self, out: dict[str, float]) -> None:
        masks = self.tuner.get_masks(self.adapter)
        heads = heads_total = kv = kv_total = ch = ch_total = 0
        removed = total = 0
        for b in self.tuner.prune_blocks(self.adapter):
            sizes = {role: layer.get_base_layer().weight.numel() for role, layer in b.layers.items()}
            total += sum(sizes.values())
            m = masks.get(b.index, {}) if b.prunable else {}
            if "units" in m:
                n_cut = int((~m["units"]).sum())
                kv += n_cut
                kv_total += b.num_kv_heads
                heads += n_cut * (b.num_heads // b.num_kv_heads)
                heads_total += b.num_heads
                removed += (
                    n_cut / b.num_kv_heads * sum(sizes.get(r, 0) for r in ("q_proj", "k_proj", "v_proj", "o_proj"))
                )
            if "channels" in m:
                n_cut = int((~m["channels"]).sum())
                ch += n_cut
                ch_total += b.intermediate
                removed += n_cut / b.intermediate * sum(sizes.get(r, 0) for r in ("gate_proj", "up_proj", "down_proj"))
        pre = "prune/"
        if kv_total:
            out[pre + "pruned_heads"] = float(heads)
            out[pre + "pruned_kv_heads"] = float(kv)
            out[pre + "attention_sparsity"] = heads / heads_total
        if ch_total:
            out[pre + "pruned_channels"] = float(ch)
            out[pre + "mlp_sparsity"] = ch / ch_total
        out[pre + "param_sparsity"] = removed / max(total, 1)

    # --------------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, level and moving-average importance (CPU copies; masks travel with the adapter).

        Under FSDP2 the importance vectors are already whole and equal on every rank (they are reduced before the
        moving average), so this is the full, replicated state; any rank's copy resumes every rank.
        """
        return {
            "last_step": self.last_step,
            "level": self.level,
            "importance": {k: v.detach().cpu().clone() for k, v in self.importance.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state.get("last_step", 0))
        self.level = float(state.get("level", 0.0))
        if "importance" in state:
            self.importance = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state["importance"].items()}


def _to_cpu(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every vector on CPU through one concatenated copy (one device sync instead of one per vector)."""
    if not vectors or all(v.device.type == "cpu" for v in vectors.values()):
        return dict(vectors)
    device = next(iter(vectors.values())).device
    flat = torch.cat([v.reshape(-1).to(device) for v in vectors.values()]).cpu()
    parts = flat.split([v.numel() for v in vectors.values()])
    return {k: part.reshape(v.shape) for (k, v), part in zip(vectors.items(), parts)}


def _moving_averages(
    olds: list[torch.Tensor | None], news: list[torch.Tensor], beta: float, keys: list[str]
) -> dict[str, torch.Tensor]:
    """:func:`~prune_peft.sparsity.loraprune.moving_average` of many vectors at once (``torch._foreach_*``: no
    Python loop of small ops): Ī ← β·Ī + (1 − β)·I, Ī = 0 before the first step (then (1 − β)·I), bit-identical to
    the one-vector function. New tensors, so a state taken earlier is not changed."""
    out: dict[str, torch.Tensor] = {}
    seen = [i for i, o in enumerate(olds) if o is not None]
    fresh = [i for i, o in enumerate(olds) if o is None]
    if seen:
        device = news[seen[0]].device
        olds_seen = [olds[i].to(device=device, dtype=torch.float32) for i in seen]  # no-op unless just loaded
        averaged = torch._foreach_mul(olds_seen, beta)
        torch._foreach_add_(averaged, [news[i] for i in seen], alpha=1.0 - beta)
        out.update({keys[i]: v for i, v in zip(seen, averaged)})
    if fresh:
        scaled = torch._foreach_mul([news[i].float() for i in fresh], 1.0 - beta)
        out.update({keys[i]: v for i, v in zip(fresh, scaled)})
    return out


def uniform_kept(kept: int, total: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (half up), within [min(multiple, total), total]."""
    if kept >= total:
        return total
    rounded = (kept + multiple // 2) // multiple * multiple
    return min(total, max(rounded, min(multiple, total)))


def _quantized(W: torch.Tensor) -> bool:
    return not W.is_floating_point()


def dense_weight(W: torch.Tensor) -> torch.Tensor:
    """The base weight as a float tensor: bitsandbytes int8 weights de-quantized as ``W_int8 · SCB / 127`` (the
    reference's 8-bit path; SCB is the per-row absmax), 4-bit ones through ``bitsandbytes.functional``; float
    weights unchanged."""
    if W.is_floating_point():
        return W
    scb = getattr(W, "SCB", None)
    if W.dtype == torch.int8 and scb is not None:
        return W.detach().float() * (scb.detach().float().reshape(-1, 1) / 127.0)
    quant_state = getattr(W, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(W.detach(), quant_state).float()
    raise ValueError(
        f"loraprune: cannot read a float weight from a {W.dtype} base weight of type {type(W).__name__} "
        "(supported: float weights and bitsandbytes int8 / 4-bit)"
    )


def _step(global_step: int) -> int:
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be a non-negative integer (optimizer steps done), got {global_step!r}")
    return global_step + 1
