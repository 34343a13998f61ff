"""GPU subset (skipped without CUDA): Triton kernels, PyTorch's cuSPARSELt/CUTLASS 2:4 GEMMs against the dense
reference, and SparseLoRA with use_semi_structured on sparse tensor cores.

conftest sets TRITON_INTERPRET=1 unless it is already set: run ``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels``
so the Triton kernels are compiled for the GPU rather than interpreted.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from prune_peft.kernels import (
    SemiStructuredFallbackWarning,
    SemiStructuredLinear,
    compress24,
    mask24,
    prune24,
    transposable_mask24,
)

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
SM80 = CUDA and torch.cuda.get_device_capability() >= (8, 0)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_sm80 = pytest.mark.skipif(not SM80, reason="needs an sm80+ GPU (2:4 sparse tensor cores)")


def _w(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", generator=g).to(dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernels_on_gpu_equal_torch(dtype):
    w = _w((256, 512), dtype)
    assert torch.equal(mask24(w, impl="triton"), mask24(w, impl="torch"))
    out_t, m_t = prune24(w, impl="triton")
    out_r, m_r = prune24(w, impl="torch")
    assert torch.equal(out_t, out_r) and torch.equal(m_t, m_r)
    assert torch.equal(transposable_mask24(w, impl="triton"), transposable_mask24(w, impl="torch"))
    if dtype != torch.float32:
        v_t, meta_t = compress24(out_r, impl="triton")
        v_r, meta_r = compress24(out_r, impl="torch")
        assert torch.equal(v_t.view(torch.int16), v_r.view(torch.int16)) and torch.equal(meta_t, meta_r)


def _pair(out_f, in_f, dtype, transposable, bias=True):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.mul_(transposable_mask24(dense.weight) if transposable else prune24(dense.weight)[1])
    sparse = copy.deepcopy(dense)
    return dense, sparse


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "cutlass"])
@pytest.mark.parametrize(("out_f", "in_f", "tokens"), [(512, 1024, 256), (100, 200, 37)])
@pytest.mark.parametrize("transposable", [False, True])
def test_sparse_linear_matches_dense(dtype, backend, out_f, in_f, tokens, transposable):
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels are sm8x-only")
    dense, sparse = _pair(out_f, in_f, dtype, transposable)
    sparse = SemiStructuredLinear.from_linear(sparse, backend=backend)
    x = _w((2, tokens, in_f), dtype, seed=1).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SemiStructuredFallbackWarning)  # must not fall back here
        y = sparse(x)
    assert sparse.semi_structured_backend(x)[0] in ("cusparselt", "cutlass")
    assert y.is_contiguous()  # a column-major view would push downstream kernels (SDPA) off their fast paths
    yr = dense(xr)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 5e-3, "atol": 5e-3}
    torch.testing.assert_close(y, yr, **tol)
    g = _w(y.shape, dtype, seed=2)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    assert (sparse._pp_ss_transposable is True) == transposable


@needs_sm80
def test_fp32_on_gpu_falls_back_exactly():
    dense, sparse = _pair(256, 256, torch.float32, False)
    sparse = SemiStructuredLinear.from_linear(sparse)
    x = _w((8, 256), torch.float32)
    with pytest.warns(SemiStructuredFallbackWarning, match="float32"):
        y = sparse(x)
    assert torch.equal(y, dense(x))


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_cutlass_pack_equals_pytorch_cutlass_layout(dtype):
    """The compiled Triton packer against PyTorch's own CUTLASS-layout converter (runs on any CUDA GPU, Hopper
    included), and on sm8x, where PyTorch builds CUTLASS 2:4 tensors, against ``from_dense`` too."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    w = prune24(_w((256, 512), dtype))[0]
    ours = compress24(w, impl="triton")
    values, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(ours[0].view(torch.int16), values.view(torch.int16)) and torch.equal(ours[1], meta)
    if torch.cuda.get_device_capability()[0] == 8:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        ref = SparseSemiStructuredTensorCUTLASS.from_dense(w)
        assert torch.equal(ours[0], ref.packed) and torch.equal(ours[1], ref.meta)


@needs_sm80
def test_sparse_lora_use_semi_structured_on_gpu(tiny_model):
    from peft import get_peft_model

    from prune_peft import SparseLoraConfig

    base = tiny_model("llama", hidden_size=256, intermediate_size=512).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(transposable_mask24(mod.weight) if ".mlp." in name else prune24(mod.weight)[1])
    cfg = {"r": 8, "target_modules": "all-linear", "init_lora_weights": False}
    ref = get_peft_model(copy.deepcopy(base), SparseLoraConfig(**cfg))
    sp = get_peft_model(copy.deepcopy(base), SparseLoraConfig(**cfg, use_semi_structured=True))
    sp.load_state_dict(ref.state_dict())  # the same factors: init_lora_weights=False draws them at random
    ids = torch.randint(0, 260, (2, 64), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SemiStructuredFallbackWarning)
        out = sp(ids, labels=ids)
    ref_out = ref(ids, labels=ids)
    torch.testing.assert_close(out.logits.float(), ref_out.logits.float(), rtol=5e-2, atol=5e-2)
    out.loss.backward()
    ref_out.loss.backward()
    for (n, p), (_, q) in zip(sp.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), q.grad.float().flatten(), dim=0)
            assert cos > 0.99, n
