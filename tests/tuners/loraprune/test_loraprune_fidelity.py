"""LoRAPrune matches the reference code (aim-uofa/LoRAPrune @ 4da52721, loraprune/utils.py and trainer.py):
the moving average starts at zero, a non-finite step is skipped for every block, importance="grad" scores the real
∂L/∂W without the optimizer ever updating the base, 8-bit bases are de-quantized as W_int8·SCB/127."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "callbacks"))
from prune_testlib import collate, loraprune_model, token_rows, training_args

from prune_peft import PruneCallback
from prune_peft.tuners.loraprune.pruner import dense_weight

N_HEADS, N_KV, HD = 4, 2, 16  # tiny_causal_lm


def _oracle(layers, element, adapter="default"):
    """Independent per-KV-unit / per-channel scores from an element importance function, with explicit loops."""

    def norm(v):
        return v / (v.norm() + 1e-8)

    per_unit = N_HEADS // N_KV
    units = torch.zeros(N_KV, dtype=torch.float64)
    for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
        imp = element(layers[role]).double()
        vec = torch.zeros(N_KV, dtype=torch.float64)
        if role == "o_proj":
            for col in range(imp.shape[1]):
                vec[(col // HD) // per_unit] += imp[:, col].sum()
        elif role == "q_proj":
            for row in range(imp.shape[0]):
                vec[(row // HD) // per_unit] += imp[row].sum()
        else:
            for row in range(imp.shape[0]):
                vec[row // HD] += imp[row].sum()
        units += norm(vec)
    channels = sum(norm(element(layers[r]).double().sum(1)) for r in ("gate_proj", "up_proj"))
    channels = channels + norm(element(layers["down_proj"]).double().sum(0))
    return units.float(), channels.float()


def _merged(layer, adapter="default"):
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return (layer.get_base_layer().weight + layer.scaling[adapter] * B @ A).detach()


def _lora_element(layer, adapter="default"):
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    g_hat = -((B - B.grad) @ (A - A.grad) - B @ A)  # one SGD step of size 1 (the reference's Ĝ)
    return (g_hat.detach() * _merged(layer, adapter)).abs()


def _backward(model, seed):
    model.zero_grad()
    model(**collate(token_rows(4, seed=seed))).loss.backward()


# ------------------------------------------------------------------------------------------- moving average


def test_moving_average_starts_at_zero_as_the_reference():
    model = loraprune_model()
    model.base_model.prepare_pruning(total_steps=10)
    blocks = model.base_model.prune_blocks()
    expected = {}
    for step, seed in enumerate((1, 2, 3)):
        _backward(model, seed)
        for b in (1, 2):
            units, channels = _oracle(blocks[b].layers, _lora_element)
            for key, new in ((f"u{b}", units), (f"c{b}", channels)):
                expected[key] = 0.9 * expected.get(key, torch.zeros_like(new)) + 0.1 * new
        model.base_model.update_importance(step)
    importance = model.base_model.pruner().importance
    assert set(importance) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(importance[key], value, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("structure", ["head+channel", "unstructured"])
def test_a_non_finite_score_skips_the_whole_update(structure):
    model = loraprune_model(structure=structure)
    model.base_model.prepare_pruning(total_steps=10)
    _backward(model, 1)
    model.base_model.update_importance(0)
    pruner = model.base_model.pruner()
    before = {k: v.clone() for k, v in pruner.importance.items()}
    assert len(before) >= 4
    _backward(model, 2)
    # one layer of the *last* pruned block goes non-finite: the blocks scored before it must not move either
    last = model.base_model.prune_blocks()[2].layers["down_proj"]
    last.lora_A["default"].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.base_model.update_importance(1)
    assert pruner.skipped_updates == 1
    assert set(pruner.importance) == set(before)
    assert all(torch.equal(pruner.importance[k], v) for k, v in before.items())
    # a finite step afterwards updates again
    _backward(model, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.base_model.update_importance(2)
    assert not all(torch.equal(pruner.importance[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- importance="grad"


def _bases(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}


def test_grad_importance_scores_the_real_base_gradient_and_drops_it():
    model = loraprune_model(importance="grad")
    bases = [
        m.get_base_layer().weight for b in model.base_model.prune_blocks() if b.prunable for m in b.layers.values()
    ]
    assert not any(W.requires_grad for W in bases)  # frozen by peft until pruning is prepared
    model.base_model.prepare_pruning(total_steps=10)
    assert all(W.requires_grad for W in bases)
    _backward(model, 1)
    blocks = model.base_model.prune_blocks()
    oracle = {}
    for b in (1, 2):

        def element(layer):
            return (layer.get_base_layer().weight.grad * _merged(layer)).abs()

        oracle[f"u{b}"], oracle[f"c{b}"] = _oracle(blocks[b].layers, element)
    model.base_model.update_importance(0)
    assert all(W.grad is None for W in bases)  # dropped before any optimizer step can see it
    importance = model.base_model.pruner().importance
    for key, value in oracle.items():
        torch.testing.assert_close(importance[key], 0.1 * value, rtol=1e-4, atol=1e-7)


class _GradRecorder(TrainerCallback):
    """Runs before PruneCallback in on_pre_optimizer_step: records the base gradients of the first step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.clone() for n, p in self.model.named_parameters() if "base_layer" in n and p.grad is not None
            }


def test_grad_importance_never_trains_the_base_with_the_stock_trainer_optimizer(tmp_path):
    steps = 6
    model = loraprune_model(importance="grad", target_sparsity=0.5, prune_every=2, warmup=0.0)
    # prepared before the Trainer builds its optimizer: the base weights require grad, so the stock optimizer holds
    # them (the harder case: the reference unfreezes only after building its optimizer)
    model.base_model.prepare_pruning(total_steps=steps)
    before = _bases(model)
    recorder = _GradRecorder(model)
    args = training_args(tmp_path, max_steps=steps, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(64), data_collator=collate,
                      callbacks=[recorder, PruneCallback()])  # fmt: skip
    trainer.create_optimizer()
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert any(id(p) in held for n, p in model.named_parameters() if "base_layer.weight" in n)
    trainer.train()
    after = _bases(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # bitwise: never updated, no weight decay either
    # the first step's scores were the real W.grad of that step (recorded before PruneCallback ran)
    assert recorder.grads
    pruner = model.base_model.pruner()
    assert pruner.level == 0.5
    for W in (m.get_base_layer().weight for b in model.base_model.prune_blocks() for m in b.layers.values()):
        assert W.grad is None and not W.requires_grad  # frozen again once the masks are final
    for m in model.base_model.get_masks().values():
        assert int((~m["channels"]).sum()) == 64


def test_grad_importance_first_step_equals_the_recorded_gradient(tmp_path):
    model = loraprune_model(importance="grad")
    recorder = _GradRecorder(model)
    args = training_args(tmp_path, max_steps=1, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(4), data_collator=collate,
                      callbacks=[recorder, PruneCallback()])  # fmt: skip
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    names = {id(m): name for name, m in model.named_modules()}
    blocks = model.base_model.prune_blocks()
    # the oracle scores the step's gradients against the weights they belong to (before the step)
    for b in (1, 2):

        def element(layer):
            prefix = names[id(layer)]
            W, A = weights[f"{prefix}.base_layer.weight"], weights[f"{prefix}.lora_A.default.weight"]
            B = weights[f"{prefix}.lora_B.default.weight"]
            grad = recorder.grads[f"{prefix}.base_layer.weight"]
            return (grad * (W + layer.scaling["default"] * B @ A)).abs()

        units, channels = _oracle(blocks[b].layers, element)
        importance = model.base_model.pruner().importance
        torch.testing.assert_close(importance[f"u{b}"], 0.1 * units, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(importance[f"c{b}"], 0.1 * channels, rtol=1e-4, atol=1e-7)


def test_grad_importance_in_a_plain_loop_needs_update_importance_before_the_step():
    model = loraprune_model(importance="grad")
    model.base_model.prepare_pruning(total_steps=10)
    _backward(model, 1)
    with pytest.raises(RuntimeError, match=r"before optimizer\.step"):
        model.base_model.update_and_allocate(0)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer.weight" in n)


def test_switching_back_to_lora_importance_refreezes_the_bases():
    model = loraprune_model(importance="grad")
    model.base_model.prepare_pruning(total_steps=10)
    model.base_model.prepare_pruning(total_steps=10, importance="lora")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


# ------------------------------------------------------------------------------------------------ quantized bases


def test_int8_base_weight_is_dequantized_as_the_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (6, 8), generator=g, dtype=torch.int8)
    W = nn.Parameter(q, requires_grad=False)
    W.SCB = torch.rand(6, generator=g) * 3  # bitsandbytes: per-row absmax
    expected = torch.tensor([[float(q[i, j]) * float(W.SCB[i]) / 127 for j in range(8)] for i in range(6)])
    torch.testing.assert_close(dense_weight(W), expected)
    f = torch.randn(3, 4)
    assert dense_weight(f) is f
    with pytest.raises(ValueError, match="int32"):
        dense_weight(torch.zeros(2, 2, dtype=torch.int32))


def test_grad_importance_refuses_a_quantized_base_before_changing_anything():
    model = loraprune_model()
    layer = model.base_model.prune_blocks()[1].layers["q_proj"]
    q = torch.zeros(layer.out_features, layer.in_features, dtype=torch.int8)
    layer.get_base_layer().weight = nn.Parameter(q, requires_grad=False)
    with pytest.raises(ValueError, match="importance='grad' needs float base weights"):
        model.base_model.prepare_pruning(total_steps=10, importance="grad")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
