"""Sharding helpers shared by the tuners: is a tensor a DTensor shard, its local part, its full value, small reductions.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter as a ``DTensor`` sharded on dim 0 (rows) outside
forward/backward; gradients are DTensors with the same placement. These helpers read them without importing
``torch.distributed.tensor`` when it is not in use, and reduce only small vectors across ranks (never a d_out×d_in
weight). Nothing here imports prune_peft.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "full",
    "is_sharded",
    "local",
    "local_rows",
    "sharding_kind",
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
