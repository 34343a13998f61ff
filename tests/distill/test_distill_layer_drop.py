import math

import numpy as np
import pytest
import torch

from prune_peft.distill import angular_distance, block_distances, drop_layers, remove_blocks
from prune_peft.distill.layer_drop import span_distances


def _np_angular(x, y):
    cos = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return math.acos(max(-1.0, min(1.0, cos))) / math.pi


def test_angular_distance_known_angles():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 1.0], [5.0, 0.0], [-2.0, 0.0], [4.0, 3.0]])
    d = angular_distance(x, y)
    expected = [0.5, 0.0, 1.0, math.acos(24 / 25) / math.pi]
    assert d.tolist() == pytest.approx(expected, abs=1e-12)


def test_angular_distance_matches_numpy_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    d = angular_distance(x, y)
    for i in range(7):
        assert d[i].item() == pytest.approx(_np_angular(x[i].double().numpy(), y[i].double().numpy()), abs=1e-10)


def test_span_distances_brute_force_with_mask():
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 5, 8, generator=g) for _ in range(6)]  # 5 blocks
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sums, count = span_distances(hidden, 2, mask)
    assert count == 8 and sums.shape == (4,)
    for start in range(4):
        brute = sum(
            _np_angular(hidden[start][b, t].double().numpy(), hidden[start + 2][b, t].double().numpy())
            for b in range(2)
            for t in range(5)
            if mask[b, t]
        )
        assert sums[start].item() == pytest.approx(brute, abs=1e-9)


def _make_identity_blocks(model, indices):
    """Zero the output projections: a pre-norm residual block then returns its input exactly."""
    with torch.no_grad():
        for i in indices:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


def test_identity_span_is_chosen_and_removal_is_exact(tiny_model):
    model = tiny_model("llama", num_hidden_layers=6)
    _make_identity_blocks(model, [2, 3])
    tokens = torch.randint(3, 259, (6, 24), generator=torch.Generator().manual_seed(0))
    student, report = drop_layers(model, n=2, calibration=tokens, batch_size=4)
    assert report.distances[2] < 1e-6 < min(d for i, d in enumerate(report.distances) if i != 2)
    assert report.start == 2 and report.removed == [2, 3]
    assert report.num_blocks_after == 4 and len(student.model.layers) == 4
    assert len(model.model.layers) == 6  # inplace=False: the teacher is untouched
    with torch.no_grad():
        assert torch.allclose(student(tokens).logits, model(tokens).logits, atol=1e-5)
    assert report.params_before - report.params_after == sum(
        p.numel() for i in (2, 3) for p in model.model.layers[i].parameters()
    )


def test_block_distances_agree_with_hf_hidden_states(tiny_model):
    model = tiny_model("llama", num_hidden_layers=5)
    tokens = torch.randint(3, 259, (3, 12), generator=torch.Generator().manual_seed(2))
    dists = block_distances(model, tokens, 2, batch_size=2)
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
    # hs[l] (l < num_layers) is the residual stream entering block l; the last entry is post-norm, so only
    # spans ending before the last block can be checked against it.
    for start in range(len(dists)):
        if start + 2 < 5:
            ref = angular_distance(hs[start], hs[start + 2]).mean().item()
            assert dists[start] == pytest.approx(ref, abs=1e-6)


def test_last_token_mode_uses_only_final_position(tiny_model):
    model = tiny_model("llama", num_hidden_layers=4)
    tokens = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(3))
    last = block_distances(model, tokens, 1, token="last")
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
    for start in range(3):
        ref = angular_distance(hs[start][:, -1], hs[start + 1][:, -1]).mean().item()
        assert last[start] == pytest.approx(ref, abs=1e-6)
    assert last != block_distances(model, tokens, 1, token="all")


def test_skip_first_and_explicit_start(tiny_model):
    model = tiny_model("llama", num_hidden_layers=4)
    _make_identity_blocks(model, [0])
    tokens = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(4))
    assert drop_layers(model, 1, calibration=tokens)[1].start == 0
    assert drop_layers(model, 1, calibration=tokens, skip_first=True)[1].start != 0
    student, report = drop_layers(model, 2, start=1)
    assert report.removed == [1, 2] and report.distances == [] and len(student.model.layers) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_student_saves_loads_and_generates_with_cache(tiny_model, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, num_hidden_layers=6)
    student, _ = drop_layers(model, 3, start=1)
    config = student.config
    assert config.num_hidden_layers == 3
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 3
    idx = [b.self_attn.layer_idx for b in student.model.layers]
    assert idx == [0, 1, 2]
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(loaded.model.layers) == 3
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids).logits, atol=1e-6)
        # the in-memory student (renumbered layer_idx) with a KV cache == the reloaded one without
        cached = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_remove_blocks_rejects_bad_indices(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"block indices must be in \[0, 3\]"):
        remove_blocks(model, [4])
    with pytest.raises(ValueError, match="cannot remove all 4"):
        remove_blocks(model, [0, 1, 2, 3])
    assert len(model.model.layers) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 4}, r"n must be an integer in \[1, 3\] \(the model has 4 decoder blocks\)"),
        ({"n": 0}, r"n must be an integer in \[1, 3\]"),
        ({"n": True}, r"n must be an integer"),
        ({"n": 1.5}, r"n must be an integer"),
        ({"n": 2, "start": 3}, r"start must be an integer in \[0, 2\]"),
        ({"n": 2}, "needs calibration data"),
        ({"n": 2, "calibration": torch.ones(1, 4, dtype=torch.long), "token": "mid"}, "token must be one of"),
    ],
)
def test_bad_input_raises_before_any_change(tiny_model, kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        drop_layers(model, **kwargs)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_inplace_modifies_the_given_model(tiny_model):
    model = tiny_model("llama")
    student, _ = drop_layers(model, 1, start=3, inplace=True)
    assert student is model and len(model.model.layers) == 3 and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropped_checkpoint_is_stock_with_consistent_layer_fields(tiny_model, tmp_path, arch):
    """Saved student: plain from_pretrained in a process without prune_peft rebuilds it with equal logits, and
    the block-indexed config fields (layer_types, max_window_layers) describe the kept blocks."""
    from transformers import AutoConfig

    from prune_peft.hub import stock_reload

    extra = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2) if arch == "qwen2" else {}
    model = tiny_model(arch, num_hidden_layers=5, **extra)
    before = list(getattr(model.config, "layer_types", None) or [])
    student, _ = drop_layers(model, 2, start=1)
    student.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.num_hidden_layers == 3
    if arch == "qwen2":
        assert before == ["full_attention"] * 2 + ["sliding_attention"] * 3
        assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        assert config.max_window_layers == 1  # blocks 0 (kept) and 1 (dropped) were full attention
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(5))  # longer than the window
    with torch.no_grad():
        expected = student(ids).logits
    out = stock_reload(tmp_path, ids)
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert out["params"] == sum(p.numel() for p in student.parameters())


def test_block_index_lists_are_renumbered():
    from types import SimpleNamespace

    from prune_peft.distill.layer_drop import _shrink_config

    cfg = SimpleNamespace(
        num_hidden_layers=5, mlp_only_layers=[0, 2, 4], layer_types=list("abcde"), architectures=["X"]
    )
    _shrink_config(cfg, 5, [0, 3, 4])
    assert cfg.mlp_only_layers == [0, 2] and cfg.layer_types == ["a", "d", "e"] and cfg.architectures == ["X"]
