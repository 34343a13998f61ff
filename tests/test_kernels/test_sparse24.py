"""Triton 2:4 kernels (run under TRITON_INTERPRET=1, set in conftest) against their torch twins and oracles."""

import itertools

import pytest
import torch

from prune_peft.kernels import sparse24 as k
from prune_peft.sparsity import is_nm_sparse, nm_mask

pytestmark = pytest.mark.skipif(not k.triton_available(), reason="triton not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask24_triton_equals_torch_and_nm_mask(dtype):
    w = _rand((64, 256), dtype)
    w[0, :8] = 0.5  # ties: the lower index wins, like nm_mask's stable sort
    w[1, :4] = torch.tensor([-1.0, 1.0, -0.0, 0.0])
    m_triton = k.mask24(w, impl="triton")
    m_torch = k.mask24(w, impl="torch")
    assert m_triton.dtype == torch.bool
    assert torch.equal(m_triton, m_torch)
    assert torch.equal(m_torch, nm_mask(w.abs().float(), 2, 4))
    assert bool((m_torch.reshape(-1, 4).sum(-1) == 2).all())
    assert m_torch[0, :4].tolist() == [True, True, False, False]


def test_mask24_with_given_scores():
    w = _rand((32, 64), torch.float16, seed=1)
    scores = _rand((32, 64), torch.float32, seed=2)  # signed scores: larger is more important
    m = k.mask24(w, scores, impl="triton")
    assert torch.equal(m, k.mask24(w, scores, impl="torch"))
    assert torch.equal(m, nm_mask(scores, 2, 4))
    assert not torch.equal(m, k.mask24(w, impl="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune24_fused_equals_reference(dtype):
    w = _rand((64, 128), dtype, seed=3)
    out_t, mask_t = k.prune24(w, impl="triton")
    out_r, mask_r = k.prune24(w, impl="torch")
    assert out_t.dtype == dtype
    assert torch.equal(mask_t, mask_r)
    assert torch.equal(out_t, out_r)
    assert torch.equal(out_r, w * nm_mask(w.abs().float(), 2, 4))
    assert is_nm_sparse(out_t, 2, 4)


def test_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 4"):
        k.mask24(torch.randn(4, 6))
    with pytest.raises(ValueError, match="scores shape"):
        k.prune24(torch.randn(4, 8), torch.randn(4, 4))


# ------------------------------------------------------------------------------------------------ transposable


def test_pattern_table_is_the_90_doubly_balanced_patterns():
    pats = k.transposable_patterns()
    assert pats.shape == (90, 4, 4)
    assert bool((pats.sum(1) == 2).all() and (pats.sum(2) == 2).all())
    assert len({tuple(p.flatten().tolist()) for p in pats}) == 90
    # brute force over all 0/1 4x4 matrices with 8 ones
    count = 0
    for ones in itertools.combinations(range(16), 8):
        m = torch.zeros(16, dtype=torch.bool)
        m[list(ones)] = True
        m = m.reshape(4, 4)
        count += bool((m.sum(0) == 2).all() and (m.sum(1) == 2).all())
    assert count == 90


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposable_triton_equals_torch(dtype):
    w = _rand((64, 128), dtype, seed=4)
    w[:4, :4] = 1.0  # an all-tie tile: lowest pattern index wins
    mt = k.transposable_mask24(w, impl="triton")
    mr = k.transposable_mask24(w, impl="torch")
    assert torch.equal(mt, mr)
    assert torch.equal(mr[:4, :4], k.transposable_patterns()[0])
    assert k.is_transposable24(w * mr)
    assert is_nm_sparse((w * mr).t().contiguous(), 2, 4)


def test_transposable_is_optimal_per_tile():
    w = _rand((16, 16), torch.float32, seed=5)
    mask = k.transposable_mask24(w, impl="triton")
    pats = k.transposable_patterns()
    for r in range(0, 16, 4):
        for c in range(0, 16, 4):
            tile = w[r : r + 4, c : c + 4].abs()
            best = max(float((tile * p).sum()) for p in pats)
            assert float((tile * mask[r : r + 4, c : c + 4]).sum()) == pytest.approx(best, rel=1e-6)
    # keeps at least as much magnitude as any greedy alternative, at most the row-wise 2:4 optimum
    assert float((w.abs() * mask).sum()) <= float((w.abs() * k.mask24(w, impl="torch")).sum()) + 1e-5


def test_transposable_with_scores_and_shape_checks():
    w = _rand((32, 32), torch.float16, seed=6)
    scores = _rand((32, 32), torch.float32, seed=7)
    assert torch.equal(k.transposable_mask24(w, scores, impl="triton"), k.transposable_mask24(w, scores, impl="torch"))
    with pytest.raises(ValueError, match="divisible by 4"):
        k.transposable_mask24(torch.randn(6, 8))
    assert not k.is_transposable24(w)


# -------------------------------------------------------------------------------------------------- compression


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (32, 64)])
def test_compress_bitwise_equal_to_pytorch_packer_and_round_trips(dtype, shape):
    w, _ = k.prune24(_rand(shape, dtype, seed=8), impl="torch")
    w[0, 0:4] = torch.tensor([0.0, -0.0, 0.0, 1.0], dtype=dtype)  # fewer than 2 non-zeros, negative zero
    w[1, 0:4] = 0.0
    v_t, meta_t = k.compress24(w, impl="triton")
    v_r, meta_r = k.compress24_reference(w)
    assert v_t.shape == (shape[0], shape[1] // 2) and meta_t.shape == (shape[0], shape[1] // 16)
    assert meta_t.dtype == torch.int16
    assert torch.equal(v_t.view(torch.int16), v_r.view(torch.int16))  # bitwise, signed zeros included
    assert torch.equal(meta_t, meta_r)
    assert torch.equal(k.decompress24(v_t, meta_t), w)


def test_compress_refuses_non_24_and_fp32():
    w = torch.ones(32, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="256 groups"):
        k.compress24(w)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        k.compress24(torch.zeros(32, 32))
    with pytest.raises(ValueError, match="divisible by 32"):
        k.compress24(torch.zeros(32, 16, dtype=torch.float16))


def test_auto_dispatch_uses_torch_on_cpu(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("Triton must not run for CPU tensors with impl='auto'")

    monkeypatch.setattr(k, "_kernels", boom)
    w = _rand((32, 32), torch.float16)
    k.mask24(w)
    k.prune24(w)
    k.transposable_mask24(w)
    k.compress24(k.prune24(w)[0])
