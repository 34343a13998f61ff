"""Sharding helpers shared by the tuners: is a tensor a DTensor shard, its local part, its full value, small reductions.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter as a ``DTensor`` sharded on dim 0 (rows) outside
forward/backward; gradients are DTensors with the same placement. These helpers read them without importing
``torch.distributed.tensor`` when it is not in use, and reduce only small vectors across ranks (never a d_out×d_in
weight). Nothing here imports prune_peft.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "ShardIssue",
    "all_gather_rows",
    "all_reduce_sum",
    "counts_once",
    "full",
    "full_many",
    "gathered_call",
    "is_sharded",
    "local",
    "local_rows",
    "refuse_sharded_bnb",
    "refuse_zero3",
    "rowwise",
    "sharding_kind",
    "sum_over_shards",
    "unsupported_shard",
    "world_size",
]


def world_size() -> int:
    """Ranks of the default process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a ``DTensor`` (FSDP2 / tensor parallel parameter or gradient)."""
    return t is not None and type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor on every rank (all-gather; use on small tensors only), the tensor otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """``(first, end)`` global rows held by this rank: a DTensor sharded on dim 0 only (FSDP2's layout), or the whole
    tensor. ValueError for any other placement (the caller names the supported setup)."""
    if not is_sharded(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in t.placements):
        raise ValueError(f"a tensor sharded as {t.placements} (only dim-0 shards, FSDP2's layout, are supported)")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])


def counts_once(t: torch.Tensor) -> bool:
    """Whether this rank's local part of DTensor ``t`` enters a Σ over all ranks exactly once: True on the first
    replica of each shard (every rank for FSDP2's 1-D mesh; one rank per shard for HSDP's replicate dimension)."""
    if not is_sharded(t):
        return world_size() <= 1 or torch.distributed.get_rank() == 0
    from torch.distributed.tensor import Replicate

    mesh = t.device_mesh
    return all(mesh.get_local_rank(i) == 0 for i, p in enumerate(t.placements) if isinstance(p, Replicate))


class _Call(nn.Module):
    def __init__(self, module: nn.Module, fn) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self):
        return self.fn()


def gathered_call(module: nn.Module, fn):
    """``fn()`` while the DTensor parameters of ``module`` (one layer, never a model) read as their full values.

    ``torch.func.functional_call`` swaps the gathered tensors in for the call and puts the shards back, so code written
    for one process runs unchanged on the same numbers it would see there (the fp32 shards, whatever FSDP2's
    mixed-precision policy gathers for forward). Every rank must call it (``full_tensor`` is a collective).
    """
    from torch.func import functional_call

    values = {f"module.{n}": p.detach().full_tensor() for n, p in module.named_parameters() if is_sharded(p)}
    if not values:
        return fn()
    return functional_call(_Call(module, fn), values, ())


def _group_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of a small tensor (a new tensor on ``t``'s device; ``t`` itself in one process)."""
    if world_size() <= 1:
        return t
    buf = t.detach().to(_group_device(), copy=True)
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_gather_rows(part: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's slice ``part`` (rank order, dim 0) into ``total`` rows (small vectors only).

    Ranks may hold different lengths (FSDP2 pads the last shard): each part is padded to the longest, gathered, and
    the padding dropped.
    """
    ws = world_size()
    if ws <= 1:
        return part
    dev = _group_device()
    sizes = torch.tensor([part.shape[0]], device=dev)
    all_sizes = [torch.zeros_like(sizes) for _ in range(ws)]
    torch.distributed.all_gather(all_sizes, sizes)
    lengths = [int(s) for s in all_sizes]
    longest = max(lengths)
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=dev)
    padded[: part.shape[0]] = part.to(dev)
    chunks = [torch.empty_like(padded) for _ in range(ws)]
    torch.distributed.all_gather(chunks, padded)
    out = torch.cat([c[:n] for c, n in zip(chunks, lengths)])
    if out.shape[0] != total:
        raise ValueError(f"gathered {out.shape[0]} rows from {ws} ranks, expected {total}")
    return out.to(part.device)


def sharding_kind(model: nn.Module) -> str | None:
    """``"fsdp2"``, ``"fsdp1"``, ``"zero3"`` or None (unsharded; DDP counts as unsharded) for ``model``."""
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        return "zero3"
    if any(type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False) for p in model.parameters()):
        return "fsdp1"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return "fsdp1"
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    if (FSDPModule and any(isinstance(m, FSDPModule) for m in model.modules())) or any(
        is_sharded(p) for p in model.parameters()
    ):
        return "fsdp2"
    return None


class ShardIssue(NamedTuple):
    """The first parameter whose sharding row-local code cannot serve (:func:`unsupported_shard`); the caller words
    the error."""

    name: str  # the parameter's name in the model
    kind: str  # "mesh" (not 1-D over all ranks), "mesh_names" (not unnamed/"fsdp") or "placement" (not dim-0 shards)
    mesh: Any  # the parameter's DeviceMesh
    reason: str  # for "placement": local_rows' reason ("a tensor sharded as ..."); "" otherwise


def unsupported_shard(model: nn.Module, *, mesh_names: bool = False) -> ShardIssue | None:
    """The first DTensor parameter of ``model`` (in ``named_parameters`` order) that is not FSDP2's plain layout, or
    None. Per parameter, in this order: its mesh must be 1-D over all ranks (a 2-D / HSDP mesh would count replicas
    twice in sums over all ranks), its dimension unnamed or named ``"fsdp"`` when ``mesh_names`` (peft sizes adapters
    on other named meshes to the local shard, as tensor parallel), and its placement dim-0 shards (:func:`local_rows`,
    which both the row-local scores and the adapters' row split need)."""
    ws = world_size()
    for name, p in model.named_parameters():
        if not is_sharded(p):
            continue
        mesh = p.device_mesh
        if mesh.ndim != 1 or mesh.size() != ws:
            return ShardIssue(name, "mesh", mesh, "")
        if mesh_names and not set(mesh.mesh_dim_names or ()) <= {"fsdp"}:
            return ShardIssue(name, "mesh_names", mesh, "")
        try:
            local_rows(p)
        except ValueError as exc:
            return ShardIssue(name, "placement", mesh, str(exc))
    return None


# ---------------------------------------------------------------------------- row-local functions (S-STE, 2:4 masks)


def rowwise(t: torch.Tensor, fn) -> torch.Tensor:
    """``fn(t)`` for a function that treats every row on its own (2:4 groups along the input dim): on a DTensor
    sharded on dim 0 (FSDP2), ``fn`` runs on the local rows and the result is wrapped with ``t``'s mesh, placements
    and global shape (no communication); a plain tensor goes to ``fn`` as is. ValueError for other placements."""
    if not is_sharded(t):
        return fn(t)
    local_rows(t)  # validates the placement (dim-0 shards or replicated)
    from torch.distributed.tensor import DTensor

    out = fn(t.to_local())
    return DTensor.from_local(out, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=out.stride())


def sum_over_shards(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Σ of a small per-rank tensor ``x`` over the ranks that hold different shards of ``like`` (a DTensor: the
    mesh dims where it is ``Shard``; replicas are not summed twice); ``x`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return x
    from torch.distributed.tensor import Shard

    mesh = like.device_mesh
    out = x
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard) and mesh.size(dim) > 1:
            group = mesh.get_group(dim)
            nccl = torch.distributed.get_backend(group) == "nccl"
            dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            buf = out.detach().to(dev, copy=True)
            torch.distributed.all_reduce(buf, group=group)
            out = buf.to(x.device)
    return out


def refuse_zero3(model: nn.Module, owner: str) -> None:
    """ValueError before any work when ``model``'s parameters are DeepSpeed ZeRO-3 partitions (``ds_numel``/``ds_id``
    attributes): DeepSpeed is not installed or tested with prune_peft, and outside forward a ZeRO-3 parameter is an
    empty placeholder, so weight-based scores and masks would see no weights."""
    names = [n for n, p in model.named_parameters() if hasattr(p, "ds_numel") or hasattr(p, "ds_id")]
    if names:
        raise ValueError(
            f"{owner}: the model's parameters are DeepSpeed ZeRO-3 partitions ({names[0]!r} and {len(names) - 1} "
            "more have ds_numel/ds_id); ZeRO-3 is not supported (DeepSpeed is not tested with prune_peft). Train "
            "with DDP, ZeRO stage 1/2, or FSDP2 (torch fully_shard / accelerate fsdp_version: 2) where the method "
            "supports it; see docs/distributed.md"
        )


def _bnb_layer(module: nn.Module) -> str | None:
    """``"Linear4bit"`` / ``"Linear8bitLt"`` when ``module`` is (or derives from) a bitsandbytes quantized linear."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return cls.__name__
    return None


def refuse_sharded_bnb(model: nn.Module, owner: str) -> None:
    """ValueError when ``model`` is FSDP2-sharded and has bitsandbytes 4-bit/8-bit layers (QLoRA-FSDP).

    bitsandbytes keeps the quantization state on the weight *Parameter object* (``Params4bit.quant_state``,
    ``Int8Params.CB``/``SCB``); FSDP2 replaces it with a plain parameter at every all-gather. With bitsandbytes 0.50
    on CPU a 4-bit layer then re-attaches the state by re-assigning ``module.weight`` inside its forward
    (``fix_4bit_weight_quant_state_from_module``) and the results go wrong silently (the loss of a fixed batch
    changes after one forward/backward with no update), and an 8-bit layer fails (``'Parameter' object has no
    attribute 'CB'``); measured by tests/callbacks/test_fsdp2_qtuning_sste.py."""
    if sharding_kind(model) != "fsdp2":
        return
    found = next(((n, k) for n, m in model.named_modules() if (k := _bnb_layer(m))), None)
    if found:
        raise ValueError(
            f"{owner}: bitsandbytes {found[1]} layers ({found[0]!r}) in an FSDP2-sharded model are not supported: "
            "bitsandbytes keeps the quantization state on the weight Parameter object, which FSDP2 replaces at every "
            "all-gather (with bitsandbytes 0.50 on CPU, 4-bit results go wrong silently and 8-bit layers fail). "
            "Train a quantized base with DDP or on one device, or shard an unquantized (bf16/fp32) base; see "
            "docs/distributed.md"
        )


def full_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`full` of many dim-0-sharded DTensors on a 1-D mesh with one all-gather (small tensors only).

    Every rank's local rows of every tensor are packed into one flat buffer; shard sizes follow DTensor's ``Shard(0)``
    split (``torch.chunk``: ⌈n/world⌉ rows per rank, the last ranks shorter or empty), so each rank can unpack every
    other rank's pieces. Values are copied bit for bit; plain tensors are returned as they are.
    """
    sharded = [i for i, t in enumerate(tensors) if is_sharded(t)]
    if not sharded:
        return list(tensors)
    if len({tensors[i].dtype for i in sharded}) > 1:  # one buffer holds one dtype: never round a value
        return [full(t) for t in tensors]
    ws = world_size()
    ref = tensors[sharded[0]]
    locals_ = [tensors[i].to_local() for i in sharded]
    # rows of each tensor on each rank, as DTensor's Shard(0) splits them
    sizes = [[len(c) for c in torch.arange(tensors[i].shape[0]).chunk(ws)] for i in sharded]
    sizes = [s + [0] * (ws - len(s)) for s in sizes]
    widths = [int(torch.Size(tensors[i].shape[1:]).numel()) for i in sharded]
    totals = [sum(s[r] * w for s, w in zip(sizes, widths)) for r in range(ws)]
    longest = max(totals)
    dev = _group_device()
    dtype = ref.to_local().dtype
    buf = torch.zeros(longest, dtype=dtype, device=dev)
    if locals_:
        flat = torch.cat([t.reshape(-1) for t in locals_]).to(dev)
        buf[: flat.numel()] = flat
    chunks = [torch.empty_like(buf) for _ in range(ws)]
    torch.distributed.all_gather(chunks, buf)
    out = list(tensors)
    offsets = [0] * ws
    for j, i in enumerate(sharded):
        pieces = []
        for r in range(ws):
            n = sizes[j][r] * widths[j]
            pieces.append(chunks[r][offsets[r] : offsets[r] + n])
            offsets[r] += n
        out[i] = torch.cat(pieces).reshape(tensors[i].shape).to(ref.to_local().device)
    return out
