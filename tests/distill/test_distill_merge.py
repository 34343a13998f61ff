import math

import numpy as np
import pytest
import torch

from prune_peft.distill import slerp, slerp_models, slerp_state_dicts
from prune_peft.distill.merge import lerp


def test_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_quarter_circle(t):
    v0, v1 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = slerp(t, v0, v1)
    assert out.tolist() == pytest.approx([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)], abs=1e-12)


def test_matches_textbook_formula_on_random_vectors():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    theta = math.acos(float(np.dot(an, bn) / (np.linalg.norm(an) * np.linalg.norm(bn))))
    for t in (0.1, 0.5, 0.9):
        ref = (math.sin((1 - t) * theta) * an + math.sin(t * theta) * bn) / math.sin(theta)
        assert np.allclose(slerp(t, a, b).numpy(), ref, atol=1e-12)


def test_equal_norm_vectors_keep_their_norm_where_lerp_shrinks():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])
    assert slerp(0.5, a, b).norm().item() == pytest.approx(3.0, rel=1e-6)
    assert lerp(0.5, a, b).norm().item() == pytest.approx(3.0 / math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_colinear_falls_back_to_lerp(scale):
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    b = scale * a
    for t in (0.3, 0.7):
        assert torch.allclose(slerp(t, a, b), (1 - t) * a + t * b, atol=1e-15)
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(slerp(0.5, zero, a), 0.5 * a)


def test_dtype_is_kept():
    a, b = torch.randn(8).half(), torch.randn(8).half()
    assert slerp(0.5, a, b).dtype == torch.float16


def test_state_dicts_per_pattern_t_and_integer_buffers():
    g = torch.Generator().manual_seed(2)
    sd0 = {"attn.w": torch.randn(4, generator=g), "mlp.w": torch.randn(4, generator=g), "steps": torch.tensor([3])}
    sd1 = {"attn.w": torch.randn(4, generator=g), "mlp.w": torch.randn(4, generator=g), "steps": torch.tensor([3])}
    out = slerp_state_dicts(sd0, sd1, {"attn.*": 0.0, "*": 1.0})
    assert torch.equal(out["attn.w"], sd0["attn.w"]) and torch.equal(out["mlp.w"], sd1["mlp.w"])
    assert torch.equal(out["steps"], sd0["steps"])
    out = slerp_state_dicts(sd0, sd1, lambda name: 0.5)
    assert torch.allclose(out["mlp.w"], slerp(0.5, sd0["mlp.w"], sd1["mlp.w"]))
    with pytest.raises(ValueError, match=r"no t pattern matches parameter 'mlp\.w'"):
        slerp_state_dicts(sd0, sd1, {"attn.*": 0.5})
    with pytest.raises(ValueError, match="non-float tensor 'steps' differs"):
        slerp_state_dicts(sd0, {**sd1, "steps": torch.tensor([4])})
    with pytest.raises(ValueError, match=r"differ in keys: only in the second \[\], only in the first \['steps'\]"):
        slerp_state_dicts(sd0, {k: v for k, v in sd1.items() if k != "steps"})
    with pytest.raises(ValueError, match="has shape"):
        slerp_state_dicts(sd0, {**sd1, "mlp.w": torch.randn(5)})
    with pytest.raises(ValueError, match=r"t must be a number in \[0, 1\]"):
        slerp_state_dicts(sd0, sd1, 1.5)


def test_slerp_models(tiny_model):
    m0, m1 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    merged = slerp_models(m0, m1, 0.0)
    assert merged is not m0
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), m0.state_dict().values()))
    merged = slerp_models(m0, m1, 0.5)
    w0, w1 = m0.model.layers[0].mlp.up_proj.weight, m1.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(merged.model.layers[0].mlp.up_proj.weight, slerp(0.5, w0, w1))
    ids = torch.randint(3, 259, (1, 6))
    assert torch.isfinite(merged(ids).logits).all()


def test_slerp_models_refuses_peft_models(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        slerp_models(peft_model, tiny_model("llama"))
