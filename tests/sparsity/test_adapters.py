"""The recompute autograd Functions against dense oracles: gradcheck in float64 and equality with plain autograd."""

import pytest
import torch
from torch.autograd import gradcheck

from prune_peft.sparsity.adapters import (
    kept_rows,
    masked_lora,
    masked_lora_merged,
    spp,
    spp_branch,
    spp_delta,
    spp_merged,
)
from prune_peft.sparsity.packing import pack_mask
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


def _packed(t):
    return pack_mask(t["mask"])


def test_masked_lora_gradcheck(tensors):
    t = tensors
    fn = lambda x, b, A, B: masked_lora(x, lambda: t["W"], b, A, B, _packed(t), D_IN, 0.7)  # noqa: E731
    assert gradcheck(fn, (t["x"], t["b"], t["A"], t["B"]))
    branch = lambda x, A, B: masked_lora(x, None, None, A, B, _packed(t), D_IN, 0.7)  # noqa: E731
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


def test_kept_rows_reads_whole_rows_including_the_padded_last_byte():
    mask = torch.ones(4, 10, dtype=torch.bool)  # 10 columns: one full byte and two bits of a padded one
    mask[1, 9] = False  # cleared in the tail byte
    mask[2, 3] = False  # cleared in the full byte
    assert kept_rows(pack_mask(mask), 10).tolist() == [True, False, False, True]
    assert kept_rows(pack_mask(torch.ones(3, 16, dtype=torch.bool)), 16).all()


@pytest.mark.parametrize("rows", ["none", "some", "all"])
@pytest.mark.parametrize("with_base", [True, False])
def test_rows_the_mask_keeps_whole_take_the_low_rank_gradient_with_the_same_values(tensors, rows, with_base):
    """Whole rows skip the dense Gᵀ X share (and an all-ones mask skips it entirely): same values as the oracle."""
    t = tensors
    mask = t["mask"].clone()
    if rows != "none":
        mask[: D_OUT if rows == "all" else D_OUT // 3] = True
    assert int(kept_rows(pack_mask(mask), D_IN).sum()) == {"none": 0, "some": D_OUT // 3, "all": D_OUT}[rows]
    W = torch.randn(D_OUT, D_IN, dtype=F64, generator=torch.Generator().manual_seed(1)) * mask
    leaves = (t["x"], t["A"], t["B"])

    def fn(x, A, B):
        if with_base:
            return masked_lora(x, lambda: W, None, A, B, pack_mask(mask), D_IN, 0.7)
        return masked_lora(x, None, None, A, B, pack_mask(mask), D_IN, 0.7)

    y = fn(*leaves)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref = torch.nn.functional.linear(t["x"], (W if with_base else 0) + 0.7 * (t["B"] @ t["A"]) * mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert gradcheck(fn, leaves)


@pytest.mark.parametrize("grad_mode, factor", [("lors", 1.0), ("lors_scaled", 0.7)])
def test_lors_modes_give_rearranged_factor_gradients(tensors, grad_mode, factor):
    """LoRS's LorsFn: ∂L/∂A_out = Gᵀ(X B_inᵀ), ∂L/∂B_in = (G A_out)ᵀ X — mask and scale dropped ("lors");
    "lors_scaled" keeps s (plain-LoRA gradients)."""
    t = tensors
    y = masked_lora(t["x"], lambda: t["W"], None, t["A"], t["B"], _packed(t), D_IN, 0.7, grad_mode)
    gx, gA, gB = torch.autograd.grad(y.sum(), (t["x"], t["A"], t["B"]))
    exact = torch.nn.functional.linear(t["x"], t["W"] + 0.7 * (t["B"] @ t["A"]) * t["mask"])
    torch.testing.assert_close(y, exact)  # the forward stays exactly masked
    torch.testing.assert_close(gx, torch.autograd.grad(exact.sum(), t["x"])[0])  # and so does the input gradient
    G = torch.ones(2 * 3, D_OUT, dtype=F64)
    X = t["x"].detach().reshape(-1, D_IN)
    A, B = t["A"].detach(), t["B"].detach()
    torch.testing.assert_close(gB, factor * G.t() @ (X @ A.t()))
    torch.testing.assert_close(gA, factor * (G @ B).t() @ X)


def test_unknown_grad_mode_is_refused(tensors):
    t = tensors
    with pytest.raises(ValueError, match=r"grad_mode=.fast.*allowed"):
        masked_lora(t["x"], lambda: t["W"], None, t["A"], t["B"], _packed(t), D_IN, 0.7, "fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merges_keep_every_zero_and_the_update_in_half_precision(dtype):
    """Merges run in fp32 and cast once: zeros stay zero, and the merged weight is round(W + ΔW), not W."""
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(16, 8, generator=g) > 0.5
    W = (torch.randn(16, 8, generator=g) * mask).to(dtype)
    delta = 0.3 * torch.randn(16, 8, generator=g) * mask  # large enough to move every kept weight
    merged = masked_lora_merged(W, delta)
    assert merged.dtype == dtype and bool((merged[~mask] == 0).all())
    assert torch.equal(merged, (W.float() + delta).to(dtype))
    W_row, w_col = torch.randn(4, 8, generator=g), torch.randn(16, 1, generator=g)
    rb = torch.arange(16) // 4
    merged = spp_merged(W, W, W_row, w_col, rb, 0.5)
    scale = 0.5 * W_row.repeat_interleave(4, 0) * w_col
    assert bool((merged[~mask] == 0).all())
    assert torch.equal(merged, (W.float() + scale * W.float()).to(dtype))


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
    delta = spp_delta(t["W"], t["W_row"].detach(), t["w_col"].detach(), row_block, 0.7)
    assert bool((delta[~t["mask"]] == 0).all())
    oracle = 0.7 * (t["W_row"].detach().repeat_interleave(3, 0) * t["w_col"].detach()) * t["W"]
    torch.testing.assert_close(delta, oracle)
    assert spp_blocks(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)] and bounds[-1] == (9, 12)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["sparse_lora", "spp"])
def test_half_precision_grad_x_is_the_sum_of_the_two_rounded_products(method, dtype, autocast):
    """Split mode: ``∂L/∂x = G W + G ΔW`` with each product rounded to the compute dtype by its GEMM and the two
    summed in fp32 (rounded once more only when x itself is in half precision); close to the fp32 oracle."""
    g = torch.Generator().manual_seed(2)
    d_out, d_in, s = 48, 40, 0.7
    mask = torch.rand(d_out, d_in, generator=g) > 0.5
    W = (torch.randn(d_out, d_in, generator=g) * mask).to(dtype)
    A = torch.randn(4, d_in, generator=g).requires_grad_()
    B = torch.randn(d_out, 4, generator=g).requires_grad_()
    W_row = torch.randn(4, d_in, generator=g).requires_grad_()
    w_col = torch.randn(d_out, 1, generator=g).requires_grad_()
    x = torch.randn(2, 16, d_in, generator=g)
    x = (x if autocast else x.to(dtype)).requires_grad_()
    G = torch.randn(2, 16, d_out, generator=g).to(torch.float32 if autocast else dtype)
    rb = torch.arange(d_out) // (d_out // 4)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        if method == "sparse_lora":
            y = masked_lora(x, lambda: W, None, A, B, pack_mask(mask), d_in, s)
        else:
            y = spp(x, lambda: W, None, W_row, w_col, rb, s)
    (grad_x,) = torch.autograd.grad(y, x, G)
    with torch.no_grad():  # the update in fp32, then rounded to the compute dtype relative to itself
        if method == "sparse_lora":
            delta = ((B * s) @ A * mask).to(dtype)  # ΔW = M ⊙ s·B A
        else:
            delta = (W_row.repeat_interleave(d_out // 4, 0) * (w_col * s) * W.float()).to(dtype)  # S ⊙ W
    g2 = G.reshape(-1, d_out).to(dtype)
    summed = (g2 @ W).float() + (g2 @ delta).float()
    want = summed if autocast else summed.to(dtype)
    assert grad_x.dtype == x.dtype
    assert torch.equal(grad_x.reshape(-1, d_in), want)
    oracle = g2.float() @ (W.float() + delta.float())
    bound = 2 * torch.finfo(dtype).eps * (g2.float().abs() @ (W.float().abs() + delta.float().abs()))  # 3 roundings
    assert bool(((grad_x.reshape(-1, d_in).float() - oracle).abs() <= bound).all())
