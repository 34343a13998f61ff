"""The recompute autograd Functions against dense oracles: gradcheck in float64 and equality with plain autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from prune_peft.tuners._functional import masked_lora, masked_lora_delta_forward, spp, spp_branch
from prune_peft.tuners._masks import PackedMasks, describe_pattern, keep_values, pack_mask, unpack_mask
from prune_peft.tuners.spp.layer import spp_blocks

D_OUT, D_IN, R = 12, 10, 3
F64 = torch.float64


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(D_OUT, D_IN, generator=g) > 0.5
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=F64) * mask
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    return {
        "mask": mask,
        "W": weight,
        "x": leaf(2, 3, D_IN),
        "b": leaf(D_OUT),
        "A": leaf(R, D_IN),
        "B": leaf(D_OUT, R),
        "W_row": leaf(4, D_IN),
        "w_col": leaf(D_OUT, 1),
    }


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


def test_packed_masks_state_dict_is_compact():
    store = PackedMasks()
    mask = torch.rand(64, 128) > 0.5
    store.set("default", mask)
    (key, value), *_ = store.state_dict().items()
    assert key == "default" and value.dtype == torch.uint8 and value.numel() == mask.numel() // 8
    assert torch.equal(store.get("default"), mask)
    store.pop("default")
    assert "default" not in store and store.state_dict() == {}


def test_describe_pattern():
    from prune_peft.sparsity import nm_mask

    scores = torch.randn(8, 16)
    assert describe_pattern([nm_mask(scores, 2, 4)]) == "2:4"
    assert describe_pattern([nm_mask(scores, 1, 4)]) == "1:4"
    assert describe_pattern([torch.rand(8, 16) > 0.5, nm_mask(scores, 2, 4)]) in ("unstructured", "4:8")


def _packed(t):
    return pack_mask(t["mask"])


def test_masked_lora_gradcheck(tensors):
    t = tensors
    fn = lambda x, b, A, B: masked_lora(x, lambda: t["W"], b, A, B, _packed(t), D_IN, 0.7)  # noqa: E731
    assert gradcheck(fn, (t["x"], t["b"], t["A"], t["B"]))
    branch = lambda x, A, B: masked_lora_delta_forward(x, A, B, _packed(t), D_IN, 0.7)  # noqa: E731
    assert gradcheck(branch, (t["x"], t["A"], t["B"]))


def test_masked_lora_equals_dense_oracle(tensors):
    t = tensors
    leaves = (t["x"], t["b"], t["A"], t["B"])
    y = masked_lora(t["x"], lambda: t["W"], t["b"], t["A"], t["B"], _packed(t), D_IN, 0.7)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    w_eff = t["W"] + 0.7 * (t["B"] @ t["A"]) * t["mask"]  # naive: ΔW = M ⊙ s·BA
    ref = torch.nn.functional.linear(t["x"], w_eff, t["b"])
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_lors_mode_gives_plain_lora_factor_gradients(tensors):
    t = tensors
    y = masked_lora(t["x"], lambda: t["W"], None, t["A"], t["B"], _packed(t), D_IN, 0.7, exact=False)
    gx, gA, gB = torch.autograd.grad(y.sum(), (t["x"], t["A"], t["B"]))
    exact = torch.nn.functional.linear(t["x"], t["W"] + 0.7 * (t["B"] @ t["A"]) * t["mask"])
    torch.testing.assert_close(y, exact)  # the forward stays exactly masked
    torch.testing.assert_close(gx, torch.autograd.grad(exact.sum(), t["x"])[0])  # and so does the input gradient
    plain = torch.nn.functional.linear(t["x"], t["W"]) + 0.7 * (t["x"] @ t["A"].t()) @ t["B"].t()
    pA, pB = torch.autograd.grad(plain.sum(), (t["A"], t["B"]))
    torch.testing.assert_close(gA, pA)
    torch.testing.assert_close(gB, pB)


def test_nothing_dense_is_saved_for_backward(tensors):
    t = tensors
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        masked_lora(t["x"], lambda: t["W"], t["b"], t["A"], t["B"], _packed(t), D_IN, 0.7)
        rb = torch.arange(D_OUT) // 3
        spp(t["x"], lambda: t["W"], t["b"], t["W_row"], t["w_col"], rb, 0.7)
    assert saved, "the functions save their inputs"
    dense = [s for s in saved if s.is_floating_point() and s.numel() >= D_OUT * D_IN]
    assert dense == [], [tuple(s.shape) for s in dense]


def _spp_oracle(t, bounds, with_base=True):
    sizes = [b - a for a, b in bounds]
    rep = t["W_row"].repeat_interleave(torch.tensor(sizes), dim=0)  # Rep(W_row)
    delta = 0.7 * (rep * t["w_col"]) * t["W"]
    return torch.nn.functional.linear(t["x"], (t["W"] if with_base else 0) + delta, t["b"] if with_base else None)


@pytest.mark.parametrize("n_blocks", [4, 5])  # 12 rows: even blocks and uneven (3,3,2,2,2) blocks
def test_spp_gradcheck_and_oracle(tensors, n_blocks):
    t = tensors
    bounds = spp_blocks(D_OUT, n_blocks)
    row_block = torch.repeat_interleave(torch.arange(n_blocks), torch.tensor([b - a for a, b in bounds]))
    W_row = torch.randn(n_blocks, D_IN, dtype=F64, requires_grad=True)
    t = {**t, "W_row": W_row}
    fused = lambda x, b, Wr, wc: spp(x, lambda: t["W"], b, Wr, wc, row_block, 0.7)  # noqa: E731
    assert gradcheck(fused, (t["x"], t["b"], W_row, t["w_col"]))
    for blockwise in (True, False):
        branch = lambda x, Wr, wc, bw=blockwise: spp_branch(  # noqa: E731
            x, lambda: t["W"], Wr, wc, row_block, bounds, 0.7, bw
        )
        assert gradcheck(branch, (t["x"], W_row, t["w_col"]))
        torch.testing.assert_close(branch(t["x"], W_row, t["w_col"]), _spp_oracle(t, bounds, with_base=False))
    torch.testing.assert_close(fused(t["x"], t["b"], W_row, t["w_col"]), _spp_oracle(t, bounds))


def test_spp_update_is_zero_where_the_base_is_zero(tensors):
    t = tensors
    bounds = spp_blocks(D_OUT, 4)
    row_block = torch.arange(D_OUT) // 3
    from prune_peft.tuners._functional import spp_delta

    delta = spp_delta(t["W"], t["W_row"].detach(), t["w_col"].detach(), row_block, 0.7)
    assert bool((delta[~t["mask"]] == 0).all())
    assert spp_blocks(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)] and bounds[-1] == (9, 12)
