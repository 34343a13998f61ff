"""Bit-packed masks: pack/unpack round trip and the 0/1 lookup against the boolean mask."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_peft.sparsity.packing import keep_values, pack_mask, unpack_mask


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 1000))
def test_pack_roundtrip(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 7) // 8)
    assert torch.equal(unpack_mask(packed, cols), mask)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        keep = keep_values(packed, cols, dtype)
        assert keep.dtype == dtype and torch.equal(keep, mask.to(dtype))
