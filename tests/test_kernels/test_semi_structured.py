"""Frozen 2:4 base: dispatch decisions, exact dense fallback, the sparse path via the CPU "emulate" backend
(real CUTLASS packing, padding, transposable backward), model-level swaps, SparseLoRA wiring and bad input."""

import copy
import pickle
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import prune_peft
from prune_peft.kernels import (
    SemiStructuredFallbackWarning,
    SemiStructuredLinear,
    choose_backend,
    disable_semi_structured,
    enable_semi_structured,
    prune24,
    semi_structured_status,
    transposable_mask24,
)
from prune_peft.kernels import adapters as ad
from prune_peft.kernels import semi_structured as ss
from prune_peft.tuners.sparse_lora.layer import SparseLoraLinear

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def _fresh_warnings():
    ss._WARNED.clear()
    yield
    ss._WARNED.clear()


def _linear(out_f, in_f, dtype=FP32, transposable=False, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        w = lin.weight
        mask = transposable_mask24(w) if transposable else prune24(w)[1]
        w.mul_(mask)
    return lin


def _pruned_model(tiny_model, transposable_mlp=False, dtype=FP32):
    model = tiny_model("llama").to(dtype)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                use_t = transposable_mlp and ".mlp." in name
                mod.weight.mul_(transposable_mask24(mod.weight) if use_t else prune24(mod.weight)[1])
    return model


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        orig = ss.packed_linear

        def spy(*a, **kw):
            self.calls += 1
            return orig(*a, **kw)

        monkeypatch.setattr(ss, "packed_linear", spy)
        monkeypatch.setattr(ad, "packed_linear", spy)


# ------------------------------------------------------------------------------------------------------ dispatch


@pytest.mark.parametrize(
    ("device", "dtype", "cap", "cslt", "requested", "expected"),
    [
        ("cuda", BF16, (8, 0), True, "auto", "cusparselt"),
        ("cuda", FP16, (9, 0), True, "auto", "cusparselt"),
        ("cuda", BF16, (8, 6), False, "auto", "cutlass"),
        ("cuda", BF16, (9, 0), False, "auto", "dense"),  # Hopper: CUTLASS 2:4 is sm8x-only
        ("cuda", BF16, (8, 0), True, "cutlass", "cutlass"),
        ("cuda", BF16, (8, 0), False, "cusparselt", "dense"),
        ("cuda", BF16, (7, 5), True, "auto", "dense"),  # Turing: no sparse tensor cores
        ("cuda", FP32, (8, 0), True, "auto", "dense"),  # fp32 unsupported
        ("cpu", BF16, None, False, "auto", "dense"),
        ("cpu", BF16, None, False, "emulate", "emulate"),
        ("cpu", FP32, None, False, "emulate", "dense"),
        ("cuda", BF16, (9, 0), True, "dense", "dense"),
    ],
)
def test_choose_backend(device, dtype, cap, cslt, requested, expected):
    backend, reason = choose_backend(device, dtype, cap, cslt, requested)
    assert backend == expected
    # a reason exactly when the fallback was forced by the environment
    assert (reason is not None) == (expected == "dense" and requested != "dense")


def test_choose_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("cuda", BF16, (8, 0), True, "magic")


# ------------------------------------------------------------------------------------------------------ fallback


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_cpu_fallback_is_bitwise_nn_linear_and_warns_once(dtype):
    lin = _linear(48, 64, dtype)
    ref = copy.deepcopy(lin)
    lin = SemiStructuredLinear.from_linear(lin)
    x = torch.randn(3, 5, 64, dtype=dtype)
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = lin(x)
        lin(x)
    fallback = [r for r in rec if issubclass(r.category, SemiStructuredFallbackWarning)]
    assert len(fallback) == 1 and "cpu" in str(fallback[0].message)
    yr = ref(xr)
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(lin.bias.grad, ref.bias.grad)
    # weight gradient: that of F.linear(x, W ⊙ M), i.e. masked, so the pattern survives an optimizer step
    assert torch.equal(lin.weight.grad, ref.weight.grad * (ref.weight != 0))


# ----------------------------------------------------------------------------------------------- sparse (emulated)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 128), (40, 36), (96, 200)])
@pytest.mark.parametrize("transposable", [False, True])
def test_emulated_sparse_path_equals_dense(monkeypatch, dtype, out_f, in_f, transposable):
    lin = _linear(out_f, in_f, dtype, transposable=transposable and in_f % 4 == 0 and out_f % 4 == 0)
    lin.weight.requires_grad_(False)  # a frozen base
    ref = copy.deepcopy(lin)
    lin = SemiStructuredLinear.from_linear(lin, backend="emulate")
    spy = _Spy(monkeypatch)
    x = torch.randn(2, 7, in_f, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lin(x), ref(xr)
    assert y.shape == yr.shape == (2, 7, out_f) and y.dtype == dtype
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)
    is_t = lin._pp_ss_transposable
    assert spy.calls == (2 if is_t else 1)  # forward always sparse; ∂L/∂x sparse only when transposable
    assert is_t == (transposable and in_f % 4 == 0 and out_f % 4 == 0)


def test_emulated_trainable_weight_gets_masked_grad_and_repacks(monkeypatch):
    lin = _linear(64, 64, BF16, seed=3)
    ref = copy.deepcopy(lin)
    lin = SemiStructuredLinear.from_linear(lin, backend="emulate")
    x = torch.randn(8, 64, dtype=BF16)
    lin(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad * (ref.weight != 0))
    packs = []
    orig = ss.pack
    monkeypatch.setattr(ss, "pack", lambda *a, **kw: packs.append(1) or orig(*a, **kw))
    lin(x)
    assert packs == []  # cached
    with torch.no_grad():  # an optimizer step: in place, bumps the version
        lin.weight.sub_(0.1 * lin.weight.grad)
        ref.weight.sub_(0.1 * ref.weight.grad * (ref.weight != 0))
    torch.testing.assert_close(lin(x), ref(x))
    assert packs == [1]


def test_weight_changed_to_non_24_falls_back_instead_of_wrong_numbers():
    lin = _linear(32, 64, BF16)
    lin = SemiStructuredLinear.from_linear(lin, backend="emulate")
    x = torch.randn(4, 64, dtype=BF16)
    lin(x)
    with torch.no_grad():  # e.g. a plain-LoRA merge densifies the base
        lin.weight[0, :4] = 1.0
    with pytest.warns(SemiStructuredFallbackWarning, match=r"no longer 2:4 .*1 of 512 groups"):
        y = lin(x)
    assert torch.equal(y, nn.functional.linear(x, lin.weight, lin.bias))
    assert lin._pp_ss_backend == "dense"


def test_plain_lora_merge_into_sparse_base_stays_correct(tiny_model):
    model = get_peft_model(
        _pruned_model(tiny_model, dtype=BF16), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ref = copy.deepcopy(model)
    enable_semi_structured(model, backend="emulate")
    ids = torch.randint(0, 260, (1, 8))
    with pytest.warns(SemiStructuredFallbackWarning, match="no longer 2:4"):
        merged = model.merge_and_unload()
        out = merged(ids).logits
    torch.testing.assert_close(out, ref.merge_and_unload()(ids).logits)


def test_sparse_lora_fused_path_checks_base_against_mask(tiny_model, monkeypatch):
    model = get_peft_model(
        _pruned_model(tiny_model, dtype=BF16), prune_peft.SparseLoraConfig(r=4, target_modules="all-linear")
    )
    enable_semi_structured(model, backend="emulate")
    ids = torch.randint(0, 260, (1, 8))
    model(ids)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert (
        ad.fused_problem(layer.get_base_layer(), layer.lora_sparse_mask.packed("default"), layer.in_features) is None
    )
    with torch.no_grad():  # a weight appears where the adapter's mask is zero
        base_w = layer.get_base_layer().weight
        row = base_w[0]
        row[(row == 0).nonzero()[0]] = 1.0
    spy = _Spy(monkeypatch)
    with pytest.warns(SemiStructuredFallbackWarning, match="outside the adapter mask"):
        model(ids)
    assert spy.calls == 27  # that layer ran its dense fused path, the 27 others sparse


def test_autocast_compute_dtype_and_fp32_master_weights():
    lin = _linear(64, 64, FP32)
    ref = copy.deepcopy(lin)
    lin = SemiStructuredLinear.from_linear(lin, backend="emulate")
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=BF16):
        y, yr = lin(x), ref(x)
    assert y.dtype == yr.dtype == BF16
    torch.testing.assert_close(y, yr)


# ---------------------------------------------------------------------------------------------------- model level


def test_enable_on_lora_model_swaps_bases_only(tiny_model):
    model = get_peft_model(_pruned_model(tiny_model, dtype=BF16), LoraConfig(r=4, target_modules="all-linear"))
    names = enable_semi_structured(model, backend="emulate")
    assert len(names) == 28 and all(n.endswith(".base_layer") for n in names)
    assert not any("lora_" in n for n in names)
    assert type(model.base_model.model.lm_head) is nn.Linear  # dense, never pruned: left alone
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear))
    status = semi_structured_status(model, torch.zeros(1, dtype=BF16))
    assert set(status.values()) == {"emulate"}
    assert set(semi_structured_status(model, torch.zeros(1, dtype=FP32)).values()) == {
        "dense: dtype torch.float32 is not supported by 2:4 sparse tensor cores here (float16/bfloat16 only)"
    }
    keys_before = set(model.state_dict())
    assert disable_semi_structured(model) == names
    assert set(model.state_dict()) == keys_before


@pytest.mark.parametrize("grad_mode", ["exact", "lors"])
def test_lora_and_sparse_lora_emulated_equal_dense(tiny_model, monkeypatch, grad_mode):
    base = _pruned_model(tiny_model, transposable_mlp=True, dtype=BF16)
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    configs = [
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, grad_mode=grad_mode),
    ]
    for cfg in configs:
        ref = get_peft_model(copy.deepcopy(base), cfg)
        sp = copy.deepcopy(ref)
        enable_semi_structured(sp, backend="emulate")
        spy = _Spy(monkeypatch)
        out_s, out_r = sp(ids, labels=ids), ref(ids, labels=ids)
        torch.testing.assert_close(out_s.logits, out_r.logits)
        out_s.loss.backward()
        out_r.loss.backward()
        # 28 sparse forwards + 12 sparse input-gradients (the 4×3 MLP layers have transposable masks)
        assert spy.calls == 40
        grads_r = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        grads_s = {n: p.grad for n, p in sp.named_parameters() if p.grad is not None}
        assert set(grads_r) == set(grads_s) and len(grads_r) == 56
        for n in grads_r:
            torch.testing.assert_close(grads_s[n], grads_r[n], msg=n)


def test_sparse_lora_use_semi_structured_flag(tiny_model):
    base = _pruned_model(tiny_model)
    ref = get_peft_model(copy.deepcopy(base), prune_peft.SparseLoraConfig(r=4, target_modules="all-linear"))
    model = get_peft_model(
        copy.deepcopy(base), prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", use_semi_structured=True)
    )
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer.get_base_layer(), SemiStructuredLinear)
    assert type(layer) is SparseLoraLinear  # no class swap: the layer's fused forward dispatches on its base
    ids = torch.randint(0, 260, (2, 8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model(ids).logits
    assert sum(issubclass(r.category, SemiStructuredFallbackWarning) for r in rec) == 1
    assert torch.equal(out, ref(ids).logits)  # CPU: the exact dense path
    merged = model.merge_and_unload()
    assert torch.equal(merged(ids).logits, ref.merge_and_unload()(ids).logits)


def test_bad_input_names_module_and_count_before_any_swap(tiny_model):
    model = _pruned_model(tiny_model)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[5, :12] = 1.0  # 3 groups broken
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.o_proj is not 2:4 sparse: 3 of 1024 groups"):
        enable_semi_structured(model)
    assert not any(isinstance(m, SemiStructuredLinear) for m in model.modules())
    cfg = prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", use_semi_structured=True)
    with pytest.raises(ValueError, match=r"o_proj is not 2:4 sparse: 3 of 1024 groups"):
        get_peft_model(model, cfg)
    assert not any(isinstance(m, SemiStructuredLinear) for m in model.modules())
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear  # injection rolled back


def test_explicit_dense_module_raises_and_nothing_found_raises(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"lm_head is not 2:4 sparse"):
        enable_semi_structured(model, modules=["lm_head"])
    with pytest.raises(ValueError, match=r"no 2:4-sparse nn\.Linear"):
        enable_semi_structured(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_semi_structured(model, backend="fast")


def test_swapped_module_copies_and_pickles():
    lin = _linear(32, 64, BF16)
    lin = SemiStructuredLinear.from_linear(lin, backend="emulate")
    x = torch.randn(2, 64, dtype=BF16)
    y = lin(x)
    assert lin._pp_ss_cache
    clone = pickle.loads(pickle.dumps(lin))
    assert clone._pp_ss_cache == {}
    assert torch.equal(clone(x), y)
    assert torch.equal(copy.deepcopy(lin)(x), y)
    assert "semi_structured=2:4" in repr(lin)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_cutlass_pack_builds_a_valid_pytorch_cutlass_tensor(dtype):
    # the GEMM is CUDA-only, but the tensor PyTorch would multiply with can be built and decoded on CPU
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    w = _linear(40, 100, dtype).weight.detach()  # padded to 64 × 128
    packed = ss.pack(w, "cutlass")
    assert isinstance(packed.handle, SparseSemiStructuredTensorCUTLASS)
    assert (packed.rows, packed.cols, packed.rows_padded, packed.cols_padded) == (40, 100, 64, 128)
    dense = packed.handle.to_dense()
    assert dense.shape == (64, 128)
    assert torch.equal(dense[:40, :100], w) and not bool(dense[40:].any()) and not bool(dense[:, 100:].any())


def test_sparse_lora_fused_pack_is_cached_until_an_optimizer_step(tiny_model, monkeypatch):
    model = get_peft_model(
        _pruned_model(tiny_model, dtype=BF16),
        prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    enable_semi_structured(model, backend="emulate")
    packs = []
    orig = ad.pack
    monkeypatch.setattr(ad, "pack", lambda *a, **kw: packs.append(1) or orig(*a, **kw))
    ids = torch.randint(0, 260, (1, 8))
    with torch.no_grad():
        model(ids)
        first = len(packs)
        model(ids)  # e.g. the next decoding step: nothing re-packed
    assert first == 28 and len(packs) == 28
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()  # bumps A/B versions
    before = len(packs)
    with torch.no_grad():
        model(ids)
    assert len(packs) - before == 28
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, layer.in_features, dtype=BF16)
    torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x), layer(x))  # caches dropped, class importable


# ------------------------------------------------------------------------------------------- module replacement


def test_enable_replaces_modules_keeping_parameters_hooks_and_optimizer(tiny_model):
    model = _pruned_model(tiny_model, dtype=BF16)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    names = enable_semi_structured(model, backend="emulate")
    up = model.model.layers[0].mlp.up_proj
    assert len(names) == 28 and type(up) is SemiStructuredLinear
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    ids = torch.randint(0, 260, (1, 8))
    model(ids)
    assert seen == [SemiStructuredLinear]  # the hook registered before the replacement still runs
    handle.remove()  # ... and its handle still removes it
    model(ids)
    assert len(seen) == 1
    assert disable_semi_structured(model) == names
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())


def test_shared_module_is_replaced_at_every_path():
    shared = _linear(32, 64, BF16)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    assert enable_semi_structured(model, backend="emulate") == ["0"]
    assert model[0] is model[2][0] and type(model[0]) is SemiStructuredLinear
    assert model[0].weight is shared.weight
    disable_semi_structured(model)
    assert model[0] is model[2][0] and type(model[0]) is nn.Linear


def test_root_linear_needs_from_linear_and_from_linear_validates():
    lin = _linear(32, 64, BF16)
    with pytest.raises(ValueError, match=r"model is itself a Linear.*SemiStructuredLinear\.from_linear"):
        enable_semi_structured(lin)
    with pytest.raises(ValueError, match=r"model is itself a SemiStructuredLinear.*to_linear\(\)"):
        disable_semi_structured(SemiStructuredLinear.from_linear(lin))
    with pytest.raises(ValueError, match="backend must be one of"):
        SemiStructuredLinear.from_linear(lin, backend="fast")
    with pytest.raises(ValueError, match=r"linear must be a torch\.nn\.Linear, got Sequential"):
        SemiStructuredLinear.from_linear(nn.Sequential(lin))
    dense = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"module q is not 2:4 sparse: \d+ of 512 groups"):
        SemiStructuredLinear.from_linear(dense, name="q")
    sparse = SemiStructuredLinear.from_linear(lin, backend="emulate", name="q")
    assert sparse.weight is lin.weight and sparse.bias is lin.bias and type(lin) is nn.Linear
    back = sparse.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    assert not any(k.startswith("_pp_ss") for k in vars(back))


def test_layer_with_accelerate_hook_is_left_alone_with_a_warning():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = nn.Sequential(_linear(32, 64, BF16), _linear(32, 64, BF16, seed=1))
    add_hook_to_module(model[1], ModelHook())
    with pytest.warns(SemiStructuredFallbackWarning, match="1 has an accelerate hook"):
        assert enable_semi_structured(model, backend="emulate") == ["0"]
    assert type(model[0]) is SemiStructuredLinear and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="accelerate hook"):
        SemiStructuredLinear.from_linear(model[1])


def test_import_does_not_need_triton():
    # triton blocked: importing prune_peft and running the 2:4 layer's CPU path must not touch it
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, prune_peft\n"
        "from prune_peft.kernels import SemiStructuredLinear, prune24\n"
        "lin = torch.nn.Linear(8, 4)\n"
        "lin.weight.data.mul_(prune24(lin.weight.data, impl='torch')[1])\n"
        "SemiStructuredLinear.from_linear(lin, backend='dense')(torch.randn(2, 8))\n"
        "assert 'prune_peft.kernels._triton24' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
