import copy
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from prune_peft import prune
from prune_peft._hf import find_decoder_blocks
from prune_peft.sparsity import is_nm_sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sparsity"))
from obs_oracle import obs_prune

CALIB = torch.randint(3, 260, (6, 32), generator=torch.Generator().manual_seed(0))


def _wanda_oracle(weight, X, sparsity=None, nm=None, n_prune=None):
    """Wanda from its formula (arXiv 2306.11695): S_ij = |W_ij|·‖X_j‖₂; the lowest ⌊s·d_in⌋ of each row, or the
    lowest M − N of every M consecutive inputs of each row; with ``n_prune`` (OWL's integer count of the linear)
    row r prunes its lowest ⌊n/R⌋ + [r < n mod R]."""
    score = weight.detach().double().abs() * X.double().pow(2).sum(0).sqrt()
    keep = torch.ones_like(weight, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(-1, m)
        low = torch.sort(groups, dim=1, stable=True).indices[:, : m - n]
        keep.view(-1, m).scatter_(1, low, False)
    elif n_prune is not None:
        rows = weight.shape[0]
        order = torch.sort(score, dim=1, stable=True).indices
        for r in range(rows):
            keep[r, order[r, : n_prune // rows + (r < n_prune % rows)]] = False
    else:
        low = torch.sort(score, dim=1, stable=True).indices[:, : int(weight.shape[1] * sparsity)]
        keep.scatter_(1, low, False)
    return weight * keep


def _linear_inputs(model, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Each linear's inputs over a full-model forward of CALIB (batches of 4), as (tokens, d_in) rows."""
    inputs = {n: [] for n in linears}
    hs = [
        m.register_forward_hook(lambda _m, i, _o, xs=inputs[n]: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        for i in range(0, CALIB.shape[0], 4):
            model(input_ids=CALIB[i : i + 4], use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(xs) for n, xs in inputs.items()}


def _assert_matches_reference(model, ref, method: str, masks: bool = False) -> None:
    """Wanda's masks and weights are the oracle's exactly; SparseGPT's weights to float rounding of its update (and,
    with ``masks``, the same zeros in every decoder linear)."""
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if method == "wanda":
            assert torch.equal(p, q), name
            continue
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        if masks and p.ndim == 2 and ".layers." in name:
            assert torch.equal(p == 0, q == 0), name


def _assert_same_parameters(a, b) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def _reference_layerwise(model, method, sparsity=None, pattern=None, block_sparsity=None, counts=None):
    """Oracle: prune block by block, collecting each block's inputs with a *full-model* forward (earlier blocks
    already pruned) — what the block-by-block driver must reproduce. Statistics, Wanda and SparseGPT are written here
    from their formulas (SparseGPT: the exact OBS solution of tests/sparsity/obs_oracle.py), not taken from
    prune_peft. ``counts``: an integer prune count per linear (full module name), instead of a sparsity."""
    nm = tuple(int(v) for v in pattern.split(":")) if pattern else None
    _, blocks = find_decoder_blocks(model)
    for b, block in enumerate(blocks):
        if block_sparsity is not None:
            sparsity = block_sparsity[b]
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        inputs = _linear_inputs(model, linears)
        with torch.no_grad():
            for n, m in linears.items():
                X = inputs[n].double()
                k = None if counts is None else counts[f"model.layers.{b}.{n}"]
                if method == "wanda":
                    m.weight.copy_(_wanda_oracle(m.weight, X, sparsity, nm, k))
                else:
                    H = 2.0 / X.shape[0] * X.T @ X
                    w, _ = obs_prune(m.weight, H, None if k is not None else sparsity, nm, n_prune=k)
                    m.weight.copy_(w.to(m.weight.dtype))


@pytest.mark.parametrize(
    ("method", "arch", "target"),
    [
        pytest.param("wanda", "llama", {"pattern": "2:4"}, id="wanda-24-llama"),
        pytest.param("wanda", "qwen2", {"pattern": "2:4"}, id="wanda-24-qwen2"),
        pytest.param("wanda", "mistral", {"pattern": "2:4"}, id="wanda-24-mistral"),
        pytest.param("sparsegpt", "qwen2", {"sparsity": 0.5}, id="sparsegpt-50pct-qwen2"),
    ],
)
def test_matches_layerwise_oracle(tiny_model, method, arch, target):
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    report = prune(model, method, calibration=CALIB, batch_size=4, progress=False, **target)
    _reference_layerwise(ref, method, **target)
    _assert_matches_reference(model, ref, method)
    if "pattern" in target:  # 2:4 in every decoder linear, half of their weights zero
        assert report.nm_valid and report.sparsity == pytest.approx(0.5)
        assert len(report.modules) == 4 * 7
        for name in report.modules:
            assert is_nm_sparse(model.get_submodule(name).weight, 2, 4)


def test_embeddings_and_lm_head_untouched(tiny_model):
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters() if "layers." not in n}
    prune(model, "wanda", sparsity=0.6, calibration=CALIB, progress=False)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_unstructured_wanda_row_counts_and_include_exclude(tiny_model):
    model = tiny_model("mistral")
    report = prune(
        model, "wanda", sparsity=0.25, calibration=CALIB, include=["*.mlp.*"], exclude=["*.down_proj"], progress=False
    )
    assert set(report.modules) == {f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj")}
    for name in report.modules:
        w = model.get_submodule(name).weight
        assert ((w == 0).sum(1) >= int(0.25 * w.shape[1])).all()
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_magnitude_scopes(tiny_model):
    model = tiny_model("llama")
    r = prune(model, "magnitude", sparsity=0.5, scope="global")
    total = sum(m["numel"] for m in r.modules.values())
    assert sum(m["zeros"] for m in r.modules.values()) == total // 2
    model = tiny_model("llama")
    r = prune(model, "magnitude", sparsity=0.3)
    for name, m in r.modules.items():
        assert m["zeros"] == int(0.3 * m["numel"]), name


def test_calibration_from_texts_and_dataset(tiny_model, tokenizer):
    from datasets import Dataset

    texts = ["To be, or not to be, that is the question. " * 4, "Whether 'tis nobler in the mind to suffer. " * 4]
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = prune(a, "wanda", sparsity=0.5, calibration=texts, tokenizer=tokenizer, nsamples=4, seqlen=16, progress=False)
    prune(
        b,
        "wanda",
        sparsity=0.5,
        calibration=Dataset.from_dict({"text": texts}),
        tokenizer=tokenizer,
        nsamples=4,
        seqlen=16,
        progress=False,
    )
    assert ra.calibration_samples == 4 and ra.calibration_seqlen == 16
    _assert_same_parameters(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="obs", sparsity=0.5), "method must be one of"),
        (dict(method="wanda", sparsity=1.0), "sparsity must be in"),
        (dict(method="wanda", sparsity=-0.1), "sparsity must be in"),
        (dict(method="wanda"), "sparsity is required"),
        (dict(method="wanda", pattern="3:2"), "impossible"),
        (dict(method="wanda", pattern="2:3"), "divisible by 3"),
        (dict(method="wanda", pattern="2:4", sparsity=0.3), "contradicts"),
        (dict(method="wanda", sparsity=0.5, calibration=[]), "empty"),
        (dict(method="wanda", sparsity=0.5, calibration=None), "needs calibration"),
        (dict(method="wanda", sparsity=0.5, include=["*.nothing"]), "matches no"),
        (dict(method="wanda", sparsity=0.5, exclude=["*.nothing"]), "matches none"),
        (dict(method="wanda", sparsity=0.5, scope="global"), "scope"),
        (dict(method="sparsegpt", sparsity=0.5, nsamples=0), "nsamples"),
        (
            dict(method="wanda", sparsity=0.5, sparsity_profile="owls"),
            r"sparsity_profile.*\['uniform', 'owl'\].*'owls'",
        ),
        (dict(method="wanda", pattern="2:4", sparsity_profile="owl"), r"sparsity_profile='owl'.*pattern='2:4'"),
        (dict(method="magnitude", sparsity=0.5, sparsity_profile="owl"), r"owl.*method='magnitude'"),
        (dict(method="wanda", sparsity=0.5, sparsity_profile="owl", owl_lambda=0.3), r"owl_lambda.*\[0, 0.25\).*0.3"),
        (dict(method="sparsegpt", sparsity=0.7, sparsity_profile="owl", owl_lambda=0.2), r"owl_lambda.*0.15"),
        (dict(method="wanda", sparsity=0.5, sparsity_profile="owl", owl_m=0), "owl_m.*> 0, got 0"),
        (dict(method="wanda", sparsity=0.5, sparsity_profile="owl", owl_m=-2.0), "owl_m"),
    ],
)
def test_bad_input_raises_before_touching_weights(tiny_model, kwargs, match):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    kwargs.setdefault("calibration", CALIB)
    with pytest.raises(ValueError, match=match):
        prune(model, progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_decoder_blocks_is_a_clear_error():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no recognizable decoder blocks"):
        prune(Plain(), "magnitude", sparsity=0.5)


def test_quantized_module_rejected(tiny_model):
    import bitsandbytes as bnb

    model = tiny_model("llama")
    dense = model.model.layers[0].mlp.down_proj
    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    model.model.layers[0].mlp.down_proj = q.to("cpu")
    with pytest.raises(ValueError, match="quantized"):
        prune(model, "magnitude", sparsity=0.5)


def test_pruned_outputs_feed_next_block(tiny_model):
    """Block 1's statistics come from block 0's *pruned* outputs: pruning only block 1 (dense block 0 upstream)
    gives a different block-1 mask than pruning every block."""
    only1 = tiny_model("llama")
    full = copy.deepcopy(only1)
    prune(only1, "wanda", sparsity=0.5, calibration=CALIB, batch_size=4, include=["model.layers.1.*"], progress=False)
    prune(full, "wanda", sparsity=0.5, calibration=CALIB, batch_size=4, progress=False)
    assert (only1.model.layers[0].mlp.up_proj.weight != 0).all()
    assert not torch.equal(only1.model.layers[1].mlp.up_proj.weight == 0, full.model.layers[1].mlp.up_proj.weight == 0)


def test_captured_block_inputs_keep_one_copy_of_equal_arguments(tiny_model):
    """Every calibration batch shares the first batch's rotary cos/sin (equal for equal-length batches), while
    hidden states and arguments that differ stay per batch."""
    from prune_peft.pruning.oneshot import _capture_block_inputs, _share_with, _StopForward

    model = tiny_model("llama")
    store: list = []
    with _capture_block_inputs(model.model.layers[0], store), torch.no_grad():
        for i in range(0, CALIB.shape[0], 2):
            with pytest.raises(_StopForward):
                model(input_ids=CALIB[i : i + 2], use_cache=False)
    assert len(store) == 3
    first = store[0][1]["position_embeddings"]
    for _args, kwargs in store[1:]:
        assert all(a is b for a, b in zip(kwargs["position_embeddings"], first))
        hs = _args[0] if _args else kwargs["hidden_states"]
        assert hs is not (store[0][0][0] if store[0][0] else store[0][1]["hidden_states"])
    a, b = torch.zeros(3), torch.ones(3)
    _, kw = _share_with(
        ((), {"x": a, "y": a, "hidden_states": a}), ((), {"x": a.clone(), "y": b, "hidden_states": a.clone()})
    )
    assert kw["x"] is a and kw["y"] is b and kw["hidden_states"] is not a


# ---------------------------------------------------------------------------------------------------- OWL profile


def _owl_oracle_sparsities(model, sparsity, m, lam):
    """OWL (Yin et al., 2023, arXiv 2310.05175) from its formula on the *dense* model: per decoder layer the
    fraction of its pooled Wanda scores |W_ij|·‖X_j‖₂ above m × their mean; min-max into [0, 2λ]; s_l = s − (n_l − n̄)
    (all layers equal in size here, so the plain mean)."""
    _, blocks = find_decoder_blocks(model)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and ".layers." in n}
    inputs = _linear_inputs(model, linears)
    ratios = []
    for b in range(len(blocks)):
        scores = [
            (mod.weight.double().abs() * inputs[n].double().pow(2).sum(0).sqrt()).flatten()
            for n, mod in linears.items()
            if f".layers.{b}." in n
        ]
        flat = torch.cat(scores)
        ratios.append((flat > m * flat.mean()).double().mean().item())
    lo, hi = min(ratios), max(ratios)
    n = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    return [sparsity - (x - sum(n) / len(n)) for x in n], ratios


@pytest.mark.parametrize(
    ("method", "arch", "sparsity", "owl_m", "owl_lambda"),
    [
        pytest.param("wanda", "llama", 0.5, 2.0, None, id="wanda-llama-m2"),
        pytest.param("wanda", "llama", 0.5, 5.0, None, id="wanda-llama-m5"),
        pytest.param("sparsegpt", "qwen2", 0.6, 2.0, 0.1, id="sparsegpt-qwen2-m2-lambda0.1"),
    ],
)
def test_owl_matches_oracle_per_layer(tiny_model, method, arch, sparsity, owl_m, owl_lambda):
    """OWL's layer sparsities are the oracle's, and each layer is pruned as the method prunes it at that sparsity.
    ``owl_lambda=None`` leaves λ at its default (0.08)."""
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    lam = 0.08 if owl_lambda is None else owl_lambda
    want, ratios = _owl_oracle_sparsities(copy.deepcopy(model), sparsity, owl_m, lam)
    given_lambda = {} if owl_lambda is None else {"owl_lambda": owl_lambda}
    report = prune(
        model,
        method,
        sparsity=sparsity,
        calibration=CALIB,
        batch_size=4,
        progress=False,
        sparsity_profile="owl",
        owl_m=owl_m,
        **given_lambda,
    )
    got = report.owl["layer_sparsity"]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(want).float())
    # each linear prunes its integer share of the layer's count (oracle), as the method prunes a given count
    counts = _owl_counts_oracle(model, got, sparsity)
    _reference_layerwise(ref, method, counts=counts)
    _assert_matches_reference(model, ref, method, masks=True)
    assert report.owl["module_prune_count"] == counts
    if method == "wanda":
        # the recorded profile (λ its default), the outlier ratios, and the exact parameter-weighted mean
        assert report.sparsity_profile == "owl" and report.owl["m"] == owl_m and report.owl["lambda"] == 0.08
        ratio = torch.tensor(list(report.owl["outlier_ratio"].values()))
        torch.testing.assert_close(ratio, torch.tensor(ratios).float())
        # the layer sparsities differ and their parameter-weighted mean is the target exactly
        assert len({round(v, 9) for v in got.values()}) == len(got) > 1
        sizes = report.owl["layer_params"]
        assert sum(got[k] * sizes[k] for k in got) / sum(sizes.values()) == pytest.approx(sparsity, abs=1e-12)
        for name, mod in report.modules.items():
            assert mod["zeros"] == counts[name], name
    else:
        per_layer = {}
        for name, mod in report.modules.items():
            layer = ".".join(name.split(".")[:3])
            z, n = per_layer.get(layer, (0, 0))
            per_layer[layer] = (z + mod["zeros"], n + mod["numel"])
        realized = [z / n for z, n in per_layer.values()]
        assert max(realized) - min(realized) > 0.05  # non-uniform
    # the realized fraction is the target rounded to whole weights, ⌊s·N + ½⌋ / N
    numel = sum(mod["numel"] for mod in report.modules.values())
    assert report.sparsity * numel == pytest.approx(math.floor(sparsity * numel + 0.5), abs=1e-6)


def _hamilton(quotas, total):
    """Largest-remainder rounding: floors, then +1 for the largest fractions (ties: earlier) until Σ = total. In exact
    rationals: linears of different sizes can tie exactly (e.g. fractions 1/3 and 4/3 mod 1), which floats would
    break by rounding noise."""
    quotas = [Fraction(q) for q in quotas]
    scaled = [q * total / sum(quotas) for q in quotas]
    out = [math.floor(x) for x in scaled]
    for i in sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - math.floor(scaled[i])), i))[: total - sum(out)]:
        out[i] += 1
    return out


def _owl_counts_oracle(model, layer_sparsity, sparsity):
    """OWL's integer prune count of every decoder linear: the layers' counts are the largest-remainder rounding of
    s_l·N_l summing to ⌊s·N + ½⌋; a layer's count is split over its linears by size the same way."""
    layers = {}
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in n:
            layers.setdefault(".".join(n.split(".")[:3]), {})[n] = mod.weight.numel()
    sizes = [sum(v.values()) for v in layers.values()]
    total = math.floor(sparsity * sum(sizes) + 0.5)
    layer_counts = _hamilton([layer_sparsity[k] * w for k, w in zip(layers, sizes)], total)
    counts = {}
    for linears, k in zip(layers.values(), layer_counts):
        counts.update(zip(linears, _hamilton(list(linears.values()), k)))
    return counts


def _decoder_zeros(model):
    """(zeros, numel) over the decoder blocks' linears, counted with plain torch."""
    zeros = numel = 0
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in n:
            zeros += int((mod.weight == 0).sum())
            numel += mod.weight.numel()
    return zeros, numel


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_realized_mean_sparsity_is_exact(tiny_model, method, sparsity):
    """With OWL the decoder linears hold exactly ⌊s·N + ½⌋ zeros (the per-row floor used to leave it short), Wanda's
    per-row counts within a linear differ by at most one, and the layers really differ."""
    model = tiny_model("llama")
    prune(model, method, sparsity=sparsity, calibration=CALIB, batch_size=4, progress=False, sparsity_profile="owl")
    zeros, numel = _decoder_zeros(model)
    assert zeros == math.floor(sparsity * numel + 0.5), (zeros, numel)
    per_layer = {}
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in n:
            row_zeros = (mod.weight == 0).sum(1)
            if method == "wanda":
                assert int(row_zeros.max() - row_zeros.min()) <= 1, n
            layer = ".".join(n.split(".")[:3])
            z, k = per_layer.get(layer, (0, 0))
            per_layer[layer] = (z + int(row_zeros.sum()), k + mod.weight.numel())
    realized = [z / k for z, k in per_layer.values()]
    assert max(realized) - min(realized) > 0.05


@pytest.mark.parametrize(
    ("method", "sparsity"),
    [("wanda", 0.5), ("wanda", 0.7), ("sparsegpt", 0.7)],
)
def test_uniform_profile_masks_match_per_row_oracle(tiny_model, method, sparsity):
    """The uniform profile keeps its masks: Wanda prunes ⌊s·d_in⌋ of every row (0.7·64 = 44.8 → 44), SparseGPT
    ⌊s·rows·cols⌋ per column block, bitwise as the plain-torch oracles."""
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    prune(model, method, sparsity=sparsity, calibration=CALIB, batch_size=4, progress=False)
    _reference_layerwise(ref, method, sparsity=sparsity)
    _assert_matches_reference(model, ref, method, masks=True)
    if method == "wanda":
        for n, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in n:
                assert ((mod.weight == 0).sum(1) == int(sparsity * mod.in_features)).all(), n


def test_owl_uniform_default_is_unchanged(tiny_model):
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = prune(a, "wanda", sparsity=0.5, calibration=CALIB, batch_size=4, progress=False)
    prune(b, "wanda", sparsity=0.5, calibration=CALIB, batch_size=4, progress=False, sparsity_profile="uniform")
    assert ra.owl is None and ra.sparsity_profile == "uniform"
    _assert_same_parameters(a, b)
    # λ = 0 reduces OWL to uniform
    c = tiny_model("llama")
    rc = prune(
        c,
        "wanda",
        sparsity=0.5,
        calibration=CALIB,
        batch_size=4,
        progress=False,
        sparsity_profile="owl",
        owl_lambda=0.0,
    )
    assert set(rc.owl["layer_sparsity"].values()) == {0.5}
    _assert_same_parameters(a, c)


def test_cli_sparsity_profile_owl(tiny_model, tokenizer, tmp_path, capsys):
    """`prune-peft prune --sparsity-profile owl` reaches prune(); a bad profile/λ fails before the model loads."""
    import json

    from prune_peft.cli import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    common = ["prune", "--model", str(src), "--method", "wanda", "--eval-windows", "0", "--seqlen", "32"]
    common += ["--nsamples", "4", "--sparsity", "0.5"]
    rc = main(
        [*common, "--sparsity-profile", "owl", "--owl-m", "2", "--owl-lambda", "0.1", "--out", str(tmp_path / "o")]
    )
    assert rc == 0
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())["prune"]
    assert report["sparsity_profile"] == "owl" and report["owl"]["m"] == 2 and report["owl"]["lambda"] == 0.1
    assert len(set(report["owl"]["layer_sparsity"].values())) > 1
    capsys.readouterr()
    rc = main([*common, "--sparsity-profile", "owl", "--owl-lambda", "0.4", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "owl_lambda" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    rc = main([*common, "--sparsity-profile", "layerwise", "--out", str(tmp_path / "bad2")])
    assert rc == 2 and "sparsity" in capsys.readouterr().err and not (tmp_path / "bad2").exists()
