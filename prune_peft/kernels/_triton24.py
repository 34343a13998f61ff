"""Triton kernels for 2:4 sparsity (imported lazily: Triton is optional).

Each kernel has a pure-torch twin in :mod:`prune_peft.kernels.sparse24` that produces bitwise-identical output;
the tests run both under ``TRITON_INTERPRET=1``. Floating-point sums are written in the same order as the torch
twin (no reassociation, no ``tl.dot``), so ties and near-ties resolve identically.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rank_keep(a0, a1, a2, a3):
    """Keep flags of the two largest of four scores; ties keep the lower index (like a stable descending sort)."""
    r0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
    r1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
    r2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
    r3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
    return r0 < 2, r1 < 2, r2 < 2, r3 < 2


@triton.jit
def mask24_kernel(
    W,  # values to prune (and to apply the mask to)
    S,  # scores (ignored unless HAS_SCORES)
    OUT,  # W ⊙ M (written only if APPLY)
    M,  # int8 mask
    n_groups,
    HAS_SCORES: tl.constexpr,
    APPLY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """2:4 mask along the last dim (groups of 4 consecutive elements), optionally fused with ``W ⊙ M``."""
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = g < n_groups
    base = g * 4
    w0 = tl.load(W + base + 0, mask=valid, other=0.0)
    w1 = tl.load(W + base + 1, mask=valid, other=0.0)
    w2 = tl.load(W + base + 2, mask=valid, other=0.0)
    w3 = tl.load(W + base + 3, mask=valid, other=0.0)
    if HAS_SCORES:
        a0 = tl.load(S + base + 0, mask=valid, other=0.0).to(tl.float32)
        a1 = tl.load(S + base + 1, mask=valid, other=0.0).to(tl.float32)
        a2 = tl.load(S + base + 2, mask=valid, other=0.0).to(tl.float32)
        a3 = tl.load(S + base + 3, mask=valid, other=0.0).to(tl.float32)
    else:
        a0 = tl.abs(w0.to(tl.float32))
        a1 = tl.abs(w1.to(tl.float32))
        a2 = tl.abs(w2.to(tl.float32))
        a3 = tl.abs(w3.to(tl.float32))
    k0, k1, k2, k3 = _rank_keep(a0, a1, a2, a3)
    tl.store(M + base + 0, k0.to(tl.int8), mask=valid)
    tl.store(M + base + 1, k1.to(tl.int8), mask=valid)
    tl.store(M + base + 2, k2.to(tl.int8), mask=valid)
    tl.store(M + base + 3, k3.to(tl.int8), mask=valid)
    if APPLY:
        tl.store(OUT + base + 0, tl.where(k0, w0, tl.zeros_like(w0)), mask=valid)
        tl.store(OUT + base + 1, tl.where(k1, w1, tl.zeros_like(w1)), mask=valid)
        tl.store(OUT + base + 2, tl.where(k2, w2, tl.zeros_like(w2)), mask=valid)
        tl.store(OUT + base + 3, tl.where(k3, w3, tl.zeros_like(w3)), mask=valid)


@triton.jit
def _pair_sum(S, rows, PA, PB, k, kvalid, valid, r: tl.constexpr):
    """Score of the column pair that pattern k keeps in tile row r: s[r, a_k] + s[r, b_k]."""
    ca = tl.load(PA + k * 4 + r, mask=kvalid, other=0)
    cb = tl.load(PB + k * 4 + r, mask=kvalid, other=0)
    a = tl.load(S + rows[:, None] + ca[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    b = tl.load(S + rows[:, None] + cb[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return a + b


@triton.jit
def transposable_mask24_kernel(
    S,  # scores, (R, C) row-major
    M,  # int8 mask out, (R, C)
    PA,  # int32 (n_patterns, 4): first kept column of each tile row
    PB,  # int32 (n_patterns, 4): second kept column
    PBITS,  # int32 (n_patterns,): bit 4r+c set where the pattern keeps (r, c)
    n_tiles,
    tiles_per_row,
    C,
    N_PATTERNS: tl.constexpr,
    NPAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per 4×4 tile, the 2-per-row-and-column pattern of maximal kept score (exhaustive over the 90 patterns)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = t < n_tiles
    base = (t // tiles_per_row) * 4 * C + (t % tiles_per_row) * 4
    k = tl.arange(0, NPAD)
    kvalid = k < N_PATTERNS
    # same summation order as the torch twin: ((row0 + row1) + row2) + row3
    score = _pair_sum(S, base, PA, PB, k, kvalid, valid, 0)
    score = score + _pair_sum(S, base + C, PA, PB, k, kvalid, valid, 1)
    score = score + _pair_sum(S, base + 2 * C, PA, PB, k, kvalid, valid, 2)
    score = score + _pair_sum(S, base + 3 * C, PA, PB, k, kvalid, valid, 3)
    score = tl.where(kvalid[None, :], score, float("-inf"))
    best = tl.argmax(score, axis=1, tie_break_left=True)
    bits = tl.load(PBITS + best, mask=valid, other=0)
    for i in tl.static_range(16):
        tl.store(M + base + (i // 4) * C + (i % 4), ((bits >> i) & 1).to(tl.int8), mask=valid)


@triton.jit
def _select4(i, v0, v1, v2, v3):
    return tl.where(i == 0, v0, tl.where(i == 1, v1, tl.where(i == 2, v2, v3)))


@triton.jit
def compress24_cutlass_kernel(
    W,  # (m, k) 16-bit float, row-major
    VALUES,  # (m, k // 2) out
    META,  # int16 (m * k // 16,) out, CUTLASS-reordered
    m,
    k,
    n_meta,
    BLOCK: tl.constexpr,
):
    """Triton port of ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.

    One lane per metadata element (16 consecutive columns of one row = 4 groups of 4). Per group the indices of
    the two kept elements are encoded exactly like PyTorch (including its conventions for groups with fewer or
    more than two non-zeros), then the int16 word is scattered to CUTLASS's ColumnMajorInterleaved<2> position.
    """
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < n_meta
    meta_ncols = k // 16
    row = e // meta_ncols
    col = e % meta_ncols
    meta = tl.zeros([BLOCK], dtype=tl.int32)
    for q in tl.static_range(4):
        src = row * k + col * 16 + q * 4
        v0 = tl.load(W + src + 0, mask=valid, other=0.0)
        v1 = tl.load(W + src + 1, mask=valid, other=0.0)
        v2 = tl.load(W + src + 2, mask=valid, other=0.0)
        v3 = tl.load(W + src + 3, mask=valid, other=0.0)
        # compare in fp32: the interpreter compares 16-bit floats by bit pattern, so -0.0 would count as non-zero
        m0 = v0.to(tl.float32) != 0
        m1 = v1.to(tl.float32) != 0
        m3 = v3.to(tl.float32) != 0
        # PyTorch's Espresso-minimised encoding (see the torch source for the table)
        expr0 = m0 & m1
        expr1 = (~m0) & m1
        expr2 = (~m0) & (~m1)
        bit0 = expr1.to(tl.int32)
        bit1 = expr2.to(tl.int32)
        bit2 = (expr0 | expr2 | m3).to(tl.int32)
        bit3 = (expr1 | (~m1)).to(tl.int32)
        idx0 = bit0 | (bit1 << 1)
        idx1 = bit2 | (bit3 << 1)
        dst = row * (k // 2) + col * 8 + q * 2
        tl.store(VALUES + dst, _select4(idx0, v0, v1, v2, v3), mask=valid)
        tl.store(VALUES + dst + 1, _select4(idx1, v0, v1, v2, v3), mask=valid)
        meta = meta | ((idx0 | (idx1 << 2)) << (4 * q))
    # CUTLASS metadata reordering (int16 meta: groups of 32 rows, interweave 4), then 2×2 swizzle
    dst_rows = row // 32 * 32 + (row % 8) * 4 + (row % 32) // 8
    dst_cols = col
    topright = ((dst_rows % 2 == 0) & (dst_cols % 2 == 1)).to(tl.int64)
    bottomleft = ((dst_rows % 2 == 1) & (dst_cols % 2 == 0)).to(tl.int64)
    dst_rows = dst_rows + topright - bottomleft
    dst_cols = dst_cols - topright + bottomleft
    offset = (dst_cols // 2) * m * 2 + dst_rows * 2 + dst_cols % 2
    tl.store(META + offset, meta.to(tl.int16), mask=valid)
