"""Per-adapter buffer containers: masks are saved bit-packed and come back unchanged."""

import torch

from prune_peft.tuners._buffers import PackedMasks


def test_packed_masks_state_dict_is_compact():
    store = PackedMasks()
    mask = torch.rand(64, 128) > 0.5
    store.set("default", mask)
    (key, value), *_ = store.state_dict().items()
    assert key == "default" and value.dtype == torch.uint8 and value.numel() == mask.numel() // 8
    assert torch.equal(store.get("default"), mask)
    store.pop("default")
    assert "default" not in store and store.state_dict() == {}
