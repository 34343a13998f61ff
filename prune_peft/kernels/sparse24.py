"""2:4 masks and CUTLASS compression: Triton kernels with pure-torch twins that give identical results.

* :func:`mask24` — keep the 2 largest scores in every 4 consecutive weights of a row (NVIDIA 2:4). Default scores
  are ``|W|``; ties keep the lower index (same convention as :func:`prune_peft.sparsity.nm_mask`); the torch path is
  :func:`prune_peft.sparsity.masks.top2of4_mask`, the formula the kernel evaluates.
* :func:`prune24` — fused ``(W ⊙ M, M)`` in one pass.
* :func:`transposable_mask24` — every 4×4 tile keeps exactly 2 per row *and* 2 per column, so ``W`` and ``Wᵀ`` are
  both 2:4 and the input-gradient matmul ``∂L/∂X = G W`` can run on sparse tensor cores too. Exact: per tile the
  best of the 90 such patterns (maximal kept score; ties → lowest pattern index). PyTorch's own
  ``_sparse_semi_structured_tile`` is greedy and by default ranks *signed* values (methods.md §8), so it is
  neither optimal nor magnitude-based.
* :func:`compress24` — values + metadata in the layout of PyTorch's CUTLASS semi-structured tensors
  (``SparseSemiStructuredTensorCUTLASS``), bitwise equal to
  ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.

Dispatch (``impl="auto"``): Triton for CUDA tensors when Triton is installed, the torch twin otherwise. Tests pass
``impl="triton"`` explicitly on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Literal

import torch

from ..sparsity.masks import is_nm_sparse, nm_violations, top2of4_mask

__all__ = [
    "compress24",
    "compress24_reference",
    "decompress24",
    "is_transposable24",
    "mask24",
    "mask24_reference",
    "prune24",
    "transposable_mask24",
    "transposable_mask24_reference",
    "transposable_patterns",
    "triton_available",
]

Impl = Literal["auto", "triton", "torch"]

# the 6 ways to keep 2 of 4 columns, in lexicographic order
_PAIRS: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))

# big blocks: the Triton interpreter costs ~3 ms per program instance; on GPU these are still modest tiles
_BLOCK_GROUPS = 1024
_BLOCK_META = 256
_BLOCK_TILES_GPU = 32
_BLOCK_TILES_INTERPRET = 512


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (kernels then run on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``)."""
    if os.environ.get("PRUNE_PEFT_DISABLE_TRITON", "") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _use_triton(t: torch.Tensor, impl: Impl) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs Triton installed (pip install 'prune_peft[triton]')")
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"impl='triton' on a {t.device.type} tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return t.device.type == "cuda" and triton_available()


def _kernels():
    from . import _triton24

    return _triton24


def _check_2d(t: torch.Tensor, what: str, rows: int = 1, cols: int = 4) -> None:
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (out_features × in_features), got shape {tuple(t.shape)}")
    if t.shape[0] % rows or t.shape[1] % cols:
        raise ValueError(
            f"{what} of shape {tuple(t.shape)} needs rows divisible by {rows} and columns divisible by {cols}"
        )


# --------------------------------------------------------------------------------------------------- row-wise 2:4


def mask24_reference(scores: torch.Tensor) -> torch.Tensor:
    """Torch twin of the Triton 2:4 mask: boolean, 2 kept per 4 along the last dim, ties keep the lower index.

    The kernel ranks scores in float32, so the twin does too (a float64 score may round to a tie there).
    """
    return top2of4_mask(scores.float())


def _launch_mask24(weight: torch.Tensor, scores: torch.Tensor | None, apply: bool):
    import triton

    w = weight.contiguous()
    s = scores.contiguous() if scores is not None else w
    mask = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    out = torch.empty_like(w) if apply else mask
    n_groups = w.numel() // 4
    grid = (triton.cdiv(n_groups, _BLOCK_GROUPS),)
    _kernels().mask24_kernel[grid](
        w, s, out, mask, n_groups, HAS_SCORES=scores is not None, APPLY=apply, BLOCK=_BLOCK_GROUPS
    )
    return (out if apply else None), mask.bool()


def mask24(weight: torch.Tensor, scores: torch.Tensor | None = None, *, impl: Impl = "auto") -> torch.Tensor:
    """Boolean 2:4 mask (True = kept) along the last dim from ``scores`` (default ``|weight|``)."""
    if weight.shape[-1] % 4:
        raise ValueError(f"2:4 needs the last dimension divisible by 4, got shape {tuple(weight.shape)}")
    if scores is not None and scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    if _use_triton(weight, impl):
        return _launch_mask24(weight, scores, apply=False)[1]
    return mask24_reference(weight.abs() if scores is None else scores)


def prune24(
    weight: torch.Tensor, scores: torch.Tensor | None = None, *, impl: Impl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused 2:4 prune: ``(W ⊙ M, M)`` with ``M = mask24(W, scores)``, one pass over ``W`` on GPU."""
    if weight.shape[-1] % 4:
        raise ValueError(f"2:4 needs the last dimension divisible by 4, got shape {tuple(weight.shape)}")
    if scores is not None and scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    if _use_triton(weight, impl):
        out, mask = _launch_mask24(weight, scores, apply=True)
        return out, mask
    mask = mask24_reference(weight.abs() if scores is None else scores)
    return weight * mask, mask


# --------------------------------------------------------------------------------------------- transposable 2:4


@functools.cache
def _pattern_table() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 90 4×4 0/1 patterns with two ones per row and per column.

    Returns (pair index per row (90, 4), first column (90, 4), second column (90, 4), bitmask (90,) with bit 4r+c).
    Order: lexicographic over the rows' pair indices, which fixes the tie-break ("lowest pattern index").
    """
    rows = []
    for choice in itertools.product(range(len(_PAIRS)), repeat=4):
        counts = [0, 0, 0, 0]
        for p in choice:
            for c in _PAIRS[p]:
                counts[c] += 1
        if counts == [2, 2, 2, 2]:
            rows.append(choice)
    idx = torch.tensor(rows, dtype=torch.int32)
    pairs = torch.tensor(_PAIRS, dtype=torch.int32)
    first, second = pairs[idx.long(), 0], pairs[idx.long(), 1]
    r = torch.arange(4, dtype=torch.int32)
    bits = ((1 << (4 * r + first)) | (1 << (4 * r + second))).sum(-1).to(torch.int32)
    return idx, first.contiguous(), second.contiguous(), bits


def transposable_patterns() -> torch.Tensor:
    """The 90 transposable 2:4 tile patterns as a boolean tensor (90, 4, 4), in tie-break order."""
    _, _, _, bits = _pattern_table()
    return ((bits[:, None] >> torch.arange(16, dtype=torch.int32)) & 1).bool().reshape(-1, 4, 4)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    rows, cols = t.shape
    return t.reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)


def _untile(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return tiles.reshape(rows // 4, cols // 4, 4, 4).permute(0, 2, 1, 3).reshape(rows, cols)


def transposable_mask24_reference(scores: torch.Tensor) -> torch.Tensor:
    """Torch twin of the Triton transposable mask (same fp32 summation order, same tie-break)."""
    _check_2d(scores, "scores", rows=4, cols=4)
    rows, cols = scores.shape
    _, first, second, _ = _pattern_table()
    first, second = first.long().to(scores.device), second.long().to(scores.device)
    tiles = _tiles(scores.float())  # (T, 4, 4)
    total = None
    for r in range(4):
        row = tiles[:, r, :]  # (T, 4)
        pair = row[:, first[:, r]] + row[:, second[:, r]]  # (T, 90)
        total = pair if total is None else total + pair
    best = total.argmax(dim=1)  # first maximum = lowest pattern index
    chosen = transposable_patterns().to(scores.device)[best]
    return _untile(chosen, rows, cols)


def transposable_mask24(
    weight: torch.Tensor, scores: torch.Tensor | None = None, *, impl: Impl = "auto"
) -> torch.Tensor:
    """Transposable 2:4 mask: each 4×4 tile keeps 2 per row and 2 per column, maximising the kept score.

    ``score(pattern) = Σ_{(r,c) kept} s_rc`` with ``s = |W|`` by default; exhaustive over the 90 patterns per tile,
    so the mask is optimal (unlike a greedy 4×4 tile sort). Needs both dims divisible by 4.
    """
    _check_2d(weight, "weight", rows=4, cols=4)
    if scores is not None and scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    s = weight.abs() if scores is None else scores
    if not _use_triton(weight, impl):
        return transposable_mask24_reference(s)
    import triton

    s = s.float().contiguous()  # |W| of fp16/bf16 is exact in fp32; the twin also sums in fp32
    rows, cols = s.shape
    _, first, second, bits = _pattern_table()
    dev = s.device
    mask = torch.empty(s.shape, dtype=torch.int8, device=dev)
    n_tiles = (rows // 4) * (cols // 4)
    block = _BLOCK_TILES_INTERPRET if dev.type != "cuda" else _BLOCK_TILES_GPU
    grid = (triton.cdiv(n_tiles, block),)
    _kernels().transposable_mask24_kernel[grid](
        s,
        mask,
        first.to(dev),
        second.to(dev),
        bits.to(dev),
        n_tiles,
        cols // 4,
        cols,
        N_PATTERNS=first.shape[0],
        NPAD=128,
        BLOCK=block,
    )
    return mask.bool()


def is_transposable24(t: torch.Tensor) -> bool:
    """True when ``t`` (2-D) is 2:4 along rows and along columns (so ``tᵀ`` is 2:4 too)."""
    if t.dim() != 2 or t.shape[0] % 4 or t.shape[1] % 4:
        return False
    return is_nm_sparse(t, 2, 4) and is_nm_sparse(t.t(), 2, 4)


# ------------------------------------------------------------------------------------------ CUTLASS compression


def compress24_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's own CPU/GPU packer: ``(values (m, k/2), int16 meta (m, k/16))`` in the CUTLASS layout."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(weight)


def decompress24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress24` (PyTorch's ``sparse_semi_structured_to_dense_cutlass``)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    return sparse_semi_structured_to_dense_cutlass(values, meta)


def compress24(weight: torch.Tensor, *, impl: Impl = "auto", check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse fp16/bf16 matrix to CUTLASS values + metadata (the ``SparseSemiStructuredTensorCUTLASS``
    layout). Needs rows divisible by 32 and columns by 32 (CUTLASS's int16-metadata tile, interleaved by 2).

    ``check=True`` refuses groups with more than two non-zeros (PyTorch's packer would silently drop the excess).
    fp32 is refused: CUTLASS stores fp32 as 1:2, a different pattern.
    """
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"compress24 supports float16/bfloat16 (CUTLASS 2:4), got {weight.dtype}")
    _check_2d(weight, "weight", rows=32, cols=32)
    if check:
        bad = nm_violations(weight, 2, 4)
        if bad:
            raise ValueError(f"compress24: {bad} groups of 4 hold more than 2 non-zeros; the matrix is not 2:4")
    if not _use_triton(weight, impl):
        return compress24_reference(weight)
    import triton

    w = weight.contiguous()
    m, k = w.shape
    values = torch.empty((m, k // 2), dtype=w.dtype, device=w.device)
    n_meta = m * k // 16
    meta = torch.empty((n_meta,), dtype=torch.int16, device=w.device)
    grid = (triton.cdiv(n_meta, _BLOCK_META),)
    _kernels().compress24_cutlass_kernel[grid](w, values, meta, m, k, n_meta, BLOCK=_BLOCK_META)
    return values, meta.view(m, k // 16)
