"""SparseLoRA / SPP on FSDP2-sharded models (``torch.distributed.fsdp.fully_shard``): layout checks and the merged
export, gathered one module at a time.

FSDP2 keeps every parameter as a ``DTensor`` sharded on dim 0 outside forward/backward (inside, the unit's parameters
are all-gathered plain tensors, so the masked forward and backward run the single-process code). Buffers — the
adapters' bit-packed masks — stay whole on every rank. What works, and how:

* the save-time zero check and the load-time mask check compare each rank's rows of the base with the same rows of
  the mask and sum two counts over ranks (``_base._mismatch``);
* ``merge`` / ``unmerge`` / ``merge_and_unload`` compute a layer's new weight on its gathered full tensors with the
  single-process code and write each rank's rows back into its shard (the model stays sharded);
* :func:`export_merged_sharded` (``prune_peft.hub.export`` on a sharded model) gathers one module at a time, merges it
  as above, and rank 0 writes safetensors shards as they fill (never the whole model on one rank).

Order: either ``get_peft_model`` (or ``PeftModel.from_pretrained``) on the unsharded model, then ``fully_shard`` per
decoder block and on the model; or ``fully_shard`` first and ``get_peft_model`` on the sharded model (a new adapter
only): :func:`check_base_for_adapters` checks the layout before injection and :func:`shard_new_adapters` makes every
adapted layer its own FSDP2 unit right after it (see there). Loading a saved adapter onto a sharded model, a second
adapter on it, FSDP1 and ZeRO-3 are refused before anything is injected.
After ``merge_and_unload`` run forwards through the FSDP2 root (the sharded ``PeftModel``), whose hooks gather the
embeddings and head. The root keeps its parameters gathered after a forward without backward: merges reshard the
tuner's units first (:func:`reshard_all`), but the tuner cannot reach a root above it (the ``PeftModel``). When that
root holds adapted layers' weights gathered (e.g. ``fully_shard`` on the model only, then an evaluation forward),
``merge_adapter`` / ``merge_and_unload`` / ``unmerge_adapter`` raise a ``ValueError`` before any change (a merge into
the gathered copy would be lost at the next reshard): call ``model.reshard()`` first (:func:`reshard_for_merge`;
:func:`gathered_by_outer_unit` reads FSDP2's ``_is_fsdp_managed_module`` mark). With ``fully_shard`` per decoder
block the adapted layers live in the tuner's own units and nothing is needed. ``export`` and
``check_sharded_layout`` reshard the root themselves.

Refused with a ``ValueError`` (:func:`check_sharded_layout`, run by ``PruneCallback.on_train_begin``): FSDP1
(``FullyShardedDataParallel``, whose FlatParameter flattens base weights and adapter factors of a unit together),
DeepSpeed ZeRO-3, trainable parameters FSDP2 does not manage (e.g. a module outside every ``fully_shard`` unit), and
a ``fully_shard`` applied to the wrapped ``nn.Linear`` itself (its weight would be sharded where the adapter reads it).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .._dist import full, is_sharded, local_rows, refuse_sharded_bnb, sharding_kind, unsupported_shard, world_size
from ..evaluation import sparsity_by_type

__all__ = [
    "check_base_for_adapters",
    "check_sharded_layout",
    "export_merged_sharded",
    "gathered_by_outer_unit",
    "refuse_gathered_base",
    "reshard_all",
    "reshard_for_merge",
    "shard_new_adapters",
]

MAX_SHARD_BYTES = 5 * 2**30  # rank 0 holds at most one file's tensors (plus one gathered layer) at a time

_SUPPORTED = (
    "supported: FSDP2 (torch.distributed.fsdp.fully_shard on the decoder blocks and the model after get_peft_model, "
    "or accelerate with fsdp_version: 2), DDP, or one device"
)


def _fsdp2_units() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return ()
    return (FSDPModule,)


def reshard_all(model: nn.Module) -> None:
    """``reshard()`` every FSDP2 unit in ``model`` (local, no communication; a no-op on sharded units). The root unit
    keeps its parameters gathered after a forward without backward; a merge written into that gathered copy would be
    dropped at the next reshard, so merges and exports start from the shards."""
    units = _fsdp2_units()
    if units:
        for module in model.modules():
            if isinstance(module, units):
                module.reshard()


_GATHERED = (
    "is managed by an FSDP unit above the tuner that holds its parameters gathered (plain tensors, not the DTensor "
    "shards): FSDP2's root (the model fully_shard was called on last, e.g. the sharded PeftModel) keeps them gathered "
    "after a forward without backward, and a merge written into that gathered copy would be dropped at the next "
    "reshard. Call model.reshard() on the FSDP2 root before {action} (FSDP1 is not supported)"
)


def gathered_by_outer_unit(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are held gathered by an FSDP unit the tuner cannot reach.

    ``fully_shard`` marks every module a unit manages (``_is_fsdp_managed_module``, set for torch.compile); outside
    forward/backward a managed parameter is a ``DTensor`` shard unless its unit is unsharded. After
    :func:`reshard_all` on the tuner's model, a plain parameter therefore means a unit above the tuner (the
    ``PeftModel`` root) is gathered: the tuner cannot reshard it (no reference to it) and refuses to merge.
    """
    # private torch attribute (set by fully_shard on every managed module, for dynamo, in torch 2.13): FSDP2 has no
    # public "is this module managed" query. Renamed, it would read False everywhere and a merge into a gathered copy
    # would be lost silently; tests/tuners/test_fsdp_edges.py asserts it on the installed torch, so that test fails.
    if not getattr(module, "_is_fsdp_managed_module", False):
        return False
    return any(not is_sharded(p) for p in module.parameters(recurse=False))


def refuse_gathered_base(layer: nn.Module, action: str = "merge") -> None:
    """ValueError if an adapter layer's base weight is held gathered by an outer FSDP unit (see above)."""
    base = layer.get_base_layer()
    if gathered_by_outer_unit(base):
        raise ValueError(f"{action}: the base layer of {type(layer).__name__} " + _GATHERED.format(action=action))


def reshard_for_merge(model: nn.Module, action: str = "merge_adapter / merge_and_unload") -> None:
    """Before a merge: reshard the tuner's own FSDP2 units (:func:`reshard_all`), then refuse, before any layer
    changes, when an outer unit keeps adapted base weights gathered (its merge would be silently lost)."""
    from ._base import sparse_layers

    reshard_all(model)
    names = [name for name, layer in sparse_layers(model).items() if gathered_by_outer_unit(layer.get_base_layer())]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{action}: {shown} " + _GATHERED.format(action=action))


def check_sharded_layout(model: nn.Module, owner: str = "sparse adapter") -> None:
    """ValueError, before any training work, for a sharded setup SparseLoRA/SPP cannot serve (see the module doc)."""
    from ._base import sparse_layers

    kind = sharding_kind(model)
    if kind is None:
        return
    if kind == "fsdp1":
        raise ValueError(
            f"{owner}: SparseLoRA/SPP on FSDP1 (FullyShardedDataParallel) is not supported: its FlatParameter "
            "flattens the base weights and adapter factors of each wrapped unit together, so the masks' rows and the "
            f"factors do not exist as tensors outside forward; {_SUPPORTED}"
        )
    if kind == "zero3":
        raise ValueError(
            f"{owner}: SparseLoRA/SPP on DeepSpeed ZeRO-3 is not supported (partitioned parameters are empty outside "
            f"forward, and DeepSpeed is not available to test it); {_SUPPORTED}, or ZeRO ≤ 2"
        )
    refuse_sharded_bnb(model, owner)  # plain loops and export reach this without PruneCallback's own check
    from ..kernels.semi_structured import SemiStructuredLinear

    reshard_all(model)  # a root gathered by a forward without backward would show plain parameters
    units = _fsdp2_units()
    for name, layer in sparse_layers(model).items():
        base = layer.get_base_layer()
        if units and isinstance(base, units):
            raise ValueError(
                f"{owner}: fully_shard was applied to the wrapped linear of {name}; its weight would stay sharded "
                "where the adapter reads it. Apply fully_shard to the decoder blocks (or to the adapter layers "
                f"themselves) instead; {_SUPPORTED}"
            )
        if isinstance(base, SemiStructuredLinear):
            raise ValueError(
                f"{owner}: {name} runs on 2:4 sparse kernels (use_semi_structured=True), which need the whole weight "
                f"on one device; train sharded models with use_semi_structured=False; {_SUPPORTED}"
            )
        try:
            local_rows(base.weight)  # only dim-0 shards (FSDP2's layout)
        except ValueError as exc:
            raise ValueError(f"{owner}: {name}: base weight is {exc}; {_SUPPORTED}") from None
    unmanaged = [n for n, p in model.named_parameters() if p.requires_grad and not is_sharded(p)]
    if unmanaged:
        raise ValueError(
            f"{owner}: the model is sharded with FSDP2 but {len(unmanaged)} trainable parameter(s) are not "
            f"(e.g. {unmanaged[0]}): FSDP2 never reduces their gradients, so ranks would diverge. Create the adapter "
            "before fully_shard and shard every module holding one (fully_shard(block) for every decoder block, then "
            f"fully_shard(model)); {_SUPPORTED}"
        )


# ------------------------------------------------------------------------------------- adapters on a sharded model

_ORDER = (
    "create or load the adapter on the unsharded model and shard afterwards (get_peft_model(model, config) or "
    "PeftModel.from_pretrained(model, path), then fully_shard(block) for every decoder block and fully_shard(model), "
    "the order accelerate's FSDP2, fsdp_version: 2, uses), or call get_peft_model once on a model sharded with "
    "FSDP2 on a 1-D mesh over all ranks"
)


def check_base_for_adapters(model: nn.Module, method: str, loading: bool = False) -> str | None:
    """Before an adapter is injected into ``model``: ``"fsdp2"`` when its parameters are FSDP2 shards the adapter can
    be sharded beside (:func:`shard_new_adapters` must then run after the injection), None when unsharded; a
    ValueError before anything changes for every setup that cannot work.

    Refused: FSDP1 and DeepSpeed ZeRO-3 (flattened or partitioned parameters), bitsandbytes layers under FSDP2
    (:func:`~prune_peft._dist.refuse_sharded_bnb`), loading a saved adapter (``loading``: its full tensors would be
    copied into DTensor shards), a model that already holds adapter layers (a second adapter: the layers are already
    FSDP2 units or inside one, a new unit cannot be added around them), and parameters that are not dim-0 shards on
    one 1-D mesh over all ranks (HSDP / 2-D meshes, tensor parallel: the adapters' units would not line up) whose
    dimension is unnamed or named ``"fsdp"`` (peft sizes the adapters of a weight on any other named mesh to its local
    shard, reading it as tensor parallel). Accepted after the sharded model ran forwards (with or without backward):
    its units are resharded first, and the adapter units then initialise at their own first forward.
    """
    kind = sharding_kind(model)
    if kind is None:
        return None
    if kind != "fsdp2":
        what = "FSDP1 (FullyShardedDataParallel)" if kind == "fsdp1" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"{method}: the model's parameters are already sharded ({kind}): {what} is not supported at all (its "
            f"flattened / partitioned parameters hold no base rows); use FSDP2 or DDP: {_ORDER}"
        )
    refuse_sharded_bnb(model, method)
    if loading:
        raise ValueError(
            f"{method}: the model's parameters are already sharded (fsdp2) and a saved adapter is being loaded "
            f"into it: its full tensors would be copied into DTensor shards; {_ORDER}"
        )
    from peft.tuners.tuners_utils import BaseTunerLayer

    present = next((n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if present is not None:
        raise ValueError(
            f"{method}: the model's parameters are already sharded (fsdp2) and it already holds adapter layers (e.g. "
            f"{present}): a second adapter cannot be added to layers FSDP2 already manages; {_ORDER}"
        )
    # after a forward without backward the root holds its parameters gathered (plain tensors): peft would freeze those
    # copies while the shards FSDP2 puts back stayed trainable, and the layout check below would skip them
    reshard_all(model)
    issue = unsupported_shard(model, mesh_names=True)
    if issue is not None:
        name, mesh = issue.name, issue.mesh
        if issue.kind == "mesh":
            raise ValueError(
                f"{method}: the model's parameters are already sharded (fsdp2) and {name} lives on a {mesh.ndim}-D "
                f"mesh of {mesh.size()} ranks (world size {world_size()}, e.g. HSDP): adapters are sharded beside a "
                f"base only on a 1-D mesh over all ranks; {_ORDER}"
            )
        if issue.kind == "mesh_names":
            raise ValueError(
                f"{method}: the model's parameters are already sharded (fsdp2) and {name} lives on a mesh named "
                f"{mesh.mesh_dim_names}: peft sizes adapters on a mesh with other dimension names to the local shard "
                f"(tensor parallel); shard with an unnamed mesh (fully_shard's default) or one named 'fsdp'; {_ORDER}"
            )
        raise ValueError(f"{method}: {name} is {issue.reason}; {_ORDER}")
    return kind


def shard_new_adapters(model: nn.Module, method: str, adapter_name: str) -> list[str]:
    """After injecting ``adapter_name`` into a model FSDP2 had already sharded: ``fully_shard`` every adapted layer
    as its own unit on its base weight's mesh, so FSDP2 all-gathers the new parameters for forward/backward and
    reduce-scatters their gradients. Returns the names of the layers sharded.

    The unit is the whole adapter layer (peft's ``LoraLayer``: ``lora_A``/``lora_B`` and any other adapter parameter
    inside it, e.g. DoRA's magnitude), with the base layer's parameters, already managed by the unit above (the
    decoder block's), passed as ``ignored_params``: SparseLoRA, SPP and LoRAPrune's element-wise forward read
    ``lora_A[a].weight`` directly instead of calling the submodule, so a unit per ``lora_A``/``lora_B`` module would
    leave them reading shards; the layer's forward pre-hook gathers them all. Every parameter is a ``Shard(0)`` DTensor
    on the base weight's mesh, so ``lora_B``'s rows are split exactly like the base weight's rows (``torch.chunk`` of
    d_out over the same ranks), as LoRAPrune's row-local scores need. Buffers (the masks) are not sharded; FSDP2 moves
    them to the mesh's device, where they already are.

    Policies: the parent unit's ``MixedPrecisionPolicy`` and ``reshard_after_forward`` cannot be read through FSDP2's
    public API, so the adapter units use FSDP2's defaults (parameters in their stored dtype, fp32 gradient reduction,
    resharded after forward). CPU offload is visible (the base shard on the CPU, the mesh on an accelerator) and is
    mirrored with ``CPUOffloadPolicy()``. Half-precision adapter parameters are upcast to float32 here, before
    sharding, as peft's default ``autocast_adapter_dtype=True`` would do after injection (peft's own cast replaces
    parameters FSDP2 already manages).

    A layer whose base weight is not a DTensor (outside every unit) or whose base ``nn.Linear`` is itself a unit is
    refused (ValueError; the caller removes the injected layers).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:  # older peft casts in place (``param.data``), which a DTensor shard would not follow
        cast_adapter_dtype = None
    if cast_adapter_dtype is not None:
        cast_adapter_dtype(model, adapter_name, autocast_adapter_dtype=True)
    units = _fsdp2_units()
    layers = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer) or all(is_sharded(p) for p in layer.parameters()):
            continue
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if not is_sharded(weight):
            raise ValueError(
                f"{method}: {name} is adapted in an FSDP2-sharded model but its base weight is not sharded (the "
                "module is outside every fully_shard unit): its adapter would not be managed by FSDP2. Shard every "
                f"decoder block and the model; {_ORDER}"
            )
        if units and isinstance(base, units):
            raise ValueError(
                f"{method}: fully_shard was applied to the wrapped linear of {name}; its weight would stay sharded "
                f"where the adapter reads it. Apply fully_shard to the decoder blocks instead; {_ORDER}"
            )
        layers.append((name, layer, weight))
    for _, layer, weight in layers:
        mesh = weight.device_mesh
        offload = weight.to_local().device.type == "cpu" and mesh.device_type != "cpu"
        fully_shard(
            layer,
            mesh=mesh,
            ignored_params={p for p in layer.parameters() if is_sharded(p)},
            offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
        )
    return [name for name, _, _ in layers]


# ------------------------------------------------------------------------------------------------- merged export


def _refuse_foreign_layers(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ._base import SparseAdapterLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older peft
        AuxiliaryTrainingWrapper = ()
    for name, module in model.named_modules():
        foreign = isinstance(module, BaseTunerLayer) and not isinstance(module, SparseAdapterLayer)
        if foreign or (AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper)):
            raise ValueError(
                f"export: {name} is a {type(module).__name__}; a sharded (FSDP2) model is exported only with "
                "SparseLoRA/SPP adapters (no plain LoRA layers, no modules_to_save); gather it on one device first"
            )


def _entries(base_model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name, module, is_sparse_layer)`` in module order: each sparse adapter layer as one unit (its merged weight
    and bias), every other module with its own parameters and persistent buffers; nothing inside a sparse layer."""
    from ._base import SparseAdapterLayer

    inside: str | None = None
    for name, module in base_model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, SparseAdapterLayer):
            inside = name + "."
            yield name, module, True
        elif module._parameters or module._buffers:
            yield name, module, False


def _plan(base_model: nn.Module, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of the merged checkpoint: ``(key, shape, saved dtype)``, from shapes only (nothing gathered)."""
    out, seen = [], set()

    def add(key: str, t: torch.Tensor) -> None:
        if id(t) in seen:  # tied weights are saved once (transformers re-ties them on load)
            return
        seen.add(id(t))
        out.append((key, tuple(t.shape), dtype if t.is_floating_point() else t.dtype))

    for name, module, sparse in _entries(base_model):
        prefix = f"{name}." if name else ""
        if sparse:
            base = module.get_base_layer()
            add(prefix + "weight", base.weight)
            if base.bias is not None:
                add(prefix + "bias", base.bias)
            continue
        for key, p in module._parameters.items():
            if p is not None:
                add(prefix + key, p)
        for key, b in module._buffers.items():
            if b is not None and key not in module._non_persistent_buffers_set:
                add(prefix + key, b)
    return out


@torch.no_grad()
def _merged_layer(layer) -> torch.Tensor:
    """The merged weight of one sparse layer as a full tensor on every rank (gathered, single-process code), checked
    to keep every zero of the base; the layer itself is left as it was."""
    from .._dist import gathered_call
    from ._base import dense_weight

    names = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    layer._pp_check_base(names)
    before = list(layer.merged_adapters)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        weight = dense_weight(layer.get_base_layer())
        zeros = weight == 0
        for adapter in names:
            weight = layer._pp_merged_weight(adapter, weight)
            layer.merged_adapters.append(adapter)
        return weight, zeros

    try:
        weight, zeros = gathered_call(layer, run)
    finally:
        layer.merged_adapters[:] = before
    if bool((zeros & (weight != 0)).any()):  # never expected; the same verdict on every rank
        raise RuntimeError(f"merge filled in zeros of {layer._pp_name}; nothing was written")
    return weight


def _write_shard(folder, filename: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(folder, filename), metadata={"format": "pt"})


def _summary(stats: dict[str, tuple[int, int, int]], other: dict[str, dict]) -> dict:
    """``sparsity_report``'s layout (the keys ``export_card`` reads) from per-module counts gathered while writing."""
    per_module = {
        name: {"numel": n, "zeros": z, "sparsity": z / max(n, 1), "2:4_violations": v}
        for name, (n, z, v) in stats.items()
    }
    zeros = sum(e["zeros"] for e in per_module.values())
    numel = sum(e["numel"] for e in per_module.values())
    return {
        "sparsity": zeros / max(numel, 1),
        "zeros": zeros,
        "numel": numel,
        "modules": per_module,
        "by_type": sparsity_by_type(per_module),
        "other": other,
        "2:4_valid_modules": sum(1 for e in per_module.values() if e["2:4_violations"] == 0),
    }


def _class_name(module: nn.Module) -> str:
    """The model's own class name (FSDP2 swaps in a subclass named ``FSDP<name>``)."""
    units = _fsdp2_units()
    return next(c.__name__ for c in type(module).__mro__ if not (units and issubclass(c, units)))


@torch.no_grad()
def export_merged_sharded(
    model: nn.Module,
    out,
    *,
    dtype: torch.dtype | None,
    overwrite: bool,
    tokenizer=None,
    card: Callable[[dict], object] | None = None,
) -> dict:
    """``export(format="merged")`` of an FSDP2-sharded ``PeftModel``: every rank must call it.

    Module by module (in order) the parameters are gathered (``DTensor.full_tensor``), sparse adapter layers merged
    with the single-process code (same numbers bit for bit, zeros checked), and rank 0 appends the tensors to the
    current safetensors file, written as soon as it reaches ``MAX_SHARD_BYTES`` (``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), then ``config.json``, the generation
    config, the tokenizer and the card (``card(summary)``). ``model`` is left unchanged and stays sharded. Returns the
    same summary on every rank.
    """
    import contextlib

    from .._hf import find_decoder_blocks
    from .._io import atomic_dir
    from ..sparsity.masks import nm_violations

    _refuse_foreign_layers(model)
    reshard_all(model)
    base_model = model.get_base_model()
    target = dtype or next((p.dtype for p in base_model.parameters() if p.is_floating_point()), torch.float32)
    plan = _plan(base_model, target)
    sizes = [torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in plan]
    shard_of, shard, used = {}, 0, 0  # files planned from shapes alone, so names carry the final count
    for (key, _, _), size in zip(plan, sizes):
        if used and used + size > MAX_SHARD_BYTES:
            shard, used = shard + 1, 0
        shard_of[key], used = shard, used + size
    n_files = shard + 1
    names = ["model.safetensors"] if n_files == 1 else [
        f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)
    ]  # fmt: skip
    try:
        prefix = find_decoder_blocks(base_model)[0] + "."
    except ValueError:
        prefix = None
    rank0 = world_size() <= 1 or torch.distributed.get_rank() == 0
    writing = atomic_dir(out, overwrite=overwrite) if rank0 else contextlib.nullcontext()
    info: dict | None = None
    with writing as tmp:
        pending: dict[str, torch.Tensor] = {}
        current, stats, other, seen = 0, {}, {}, {}

        def emit(key: str, t: torch.Tensor, module_name: str, pruned: bool) -> None:
            nonlocal current, pending
            if key not in shard_of or key in pending:  # a tied duplicate (planned once)
                return
            if not rank0:
                return
            if shard_of[key] != current:
                _write_shard(tmp, names[current], pending)
                pending, current = {}, shard_of[key]
            value = t.detach().to("cpu")
            value = value.to(target) if value.is_floating_point() else value
            pending[key] = value.contiguous()
            if key.endswith(".weight") and value.dim() == 2:
                zeros = int((value == 0).sum())
                if pruned:
                    stats[module_name] = (value.numel(), zeros, nm_violations(value, 2, 4))
                else:
                    other[module_name] = {"numel": value.numel(), "zeros": zeros, "tied": None}

        for name, module, sparse in _entries(base_model):
            head = f"{name}." if name else ""
            in_blocks = prefix is None or name.startswith(prefix)
            if sparse:
                weight = _merged_layer(module)  # collective: every rank
                base = module.get_base_layer()
                emit(head + "weight", weight, name, in_blocks)
                if base.bias is not None:
                    emit(head + "bias", full(base.bias), name, in_blocks)
                del weight
                continue
            linear = isinstance(module, nn.Linear)
            for key, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) in seen:  # tied: the card marks it, the file keeps one copy
                    if key == "weight" and rank0:
                        other[name] = {"numel": 0, "zeros": 0, "tied": seen[id(p)]}
                    continue
                seen[id(p)] = name
                emit(head + key, full(p), name, in_blocks and linear)
            for key, b in module._buffers.items():
                if b is not None and key not in module._non_persistent_buffers_set:
                    emit(head + key, full(b), name, False)
        if rank0:
            _write_shard(tmp, names[current], pending)
            pending = {}
            if n_files > 1:
                index = {
                    "metadata": {"total_size": sum(sizes)},
                    "weight_map": {key: names[i] for key, i in shard_of.items()},
                }
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            config = copy.deepcopy(base_model.config)
            config.architectures = [_class_name(base_model)]
            config.dtype = target
            config.save_pretrained(tmp)
            generation = getattr(base_model, "generation_config", None)
            if generation is not None and getattr(base_model, "can_generate", lambda: False)():
                generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            summary = _summary(stats, other)
            if card is not None:
                card(summary).save(tmp / "README.md")
            info = {
                "format": "merged",
                "path": str(out),
                "dtype": str(target).removeprefix("torch."),
                "sparsity": summary["sparsity"],
                "by_type": {k: v["sparsity"] for k, v in summary["by_type"].items()},
                "modules": len(summary["modules"]),
                "2:4_valid_modules": summary["2:4_valid_modules"],
                "files": len(names),
            }
    if world_size() > 1:  # every rank returns once the folder is in place, with rank 0's summary
        box = [info]
        torch.distributed.broadcast_object_list(box, src=0)
        info = box[0]
    return info
