"""S-STE from the Trainer: PruneCallback(method="s-ste") and SSTECallback, mask-flip metrics, finalize, resume β."""

import pytest
import torch
from prune_testlib import collate, token_rows, training_args
from torch import nn
from transformers import Trainer, TrainerCallback

from prune_peft.callbacks import PruneCallback, SSTECallback, apply_sste, finalize_sste
from prune_peft.callbacks.sste import SSTEDriver, load_sste_betas, sste_betas, sste_layers
from prune_peft.sparsity import is_nm_sparse
from prune_peft.sparsity.sste import SSTELinear, soft_threshold24, sste_scale
from prune_peft.testing import tiny_causal_lm


def _train(tmp_path, callback, steps=4, lr=5e-2):
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    args = training_args(tmp_path, max_steps=steps, learning_rate=lr)
    trainer = Trainer(
        model=model, args=args, train_dataset=token_rows(16), data_collator=collate, callbacks=[callback]
    )
    trainer.train()
    return model, trainer


def test_apply_sste_replaces_layers_in_place_and_forward_is_24():
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    keys = set(model.state_dict())
    names = apply_sste(model)
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert set(model.state_dict()) == keys  # β is a non-persistent buffer
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, SSTELinear)
    assert float(layer.sste_scale) == pytest.approx(float(sste_scale(layer.weight)))
    x = torch.randn(3, layer.in_features)
    s, _ = soft_threshold24(layer.weight.detach())
    torch.testing.assert_close(layer(x), nn.functional.linear(x, s * layer.sste_scale, layer.bias))
    assert is_nm_sparse(layer.sparse_weight().detach(), 2, 4)


def test_apply_and_finalize_keep_the_parameter_objects():
    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the replacement, as the Trainer does
    apply_sste(model)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is SSTELinear and layer.weight is params["model.layers.0.mlp.up_proj.weight"]
    assert list(dict(model.named_parameters())) == list(params)
    assert all(p is params[n] for n, p in model.named_parameters())
    before = layer.weight.detach().clone()
    model(torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    opt.step()
    assert not torch.equal(layer.weight.detach(), before)  # the optimizer trains the S-STE layer's weight
    expected = layer.sparse_weight().detach()
    finalize_sste(model)
    linear = model.model.layers[0].mlp.up_proj
    assert type(linear) is nn.Linear and linear.weight is params["model.layers.0.mlp.up_proj.weight"]
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(linear.weight.detach(), expected, rtol=0, atol=0)


def test_apply_sste_replaces_a_shared_layer_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert apply_sste(model) == ["0"]
    assert type(model[0]) is SSTELinear and model[2] is model[0] and model[0].weight is shared.weight
    finalize_sste(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0] and model[0].weight is shared.weight
    with pytest.raises(ValueError, match=r"wrap a bare nn\.Linear"):
        apply_sste(nn.Linear(8, 8))


def test_apply_sste_rejects_bad_width():
    lin = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ValueError, match="0 has in_features=6"):
        apply_sste(lin)


def test_prune_callback_s_ste_logs_flips_and_finalizes(tmp_path):
    callback = PruneCallback(method="s-ste")
    model, trainer = _train(tmp_path, callback)
    assert len(sste_layers(model)) == 14
    logged = [h for h in trainer.state.log_history if "sste/mask_flip_fraction" in h]
    assert len(logged) == 4  # logging_steps=1
    fractions = [h["sste/mask_flip_fraction"] for h in logged]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert sum(h["sste/mask_flips"] for h in logged) > 0  # lr 5e-2 moves some masks
    # dense weights trained with STE gradients: the pruned positions changed too
    ids = torch.tensor([token_rows(1)[0]["input_ids"]])
    before = model(ids).logits
    names = finalize_sste(model)
    assert len(names) == 14 and not sste_layers(model)
    for name in names:
        assert is_nm_sparse(model.get_submodule(name).weight, 2, 4)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_sste_callback_standalone(tmp_path):
    callback = SSTECallback(finalize=True)
    model, trainer = _train(tmp_path, callback, steps=3)
    assert not sste_layers(model)  # finalized at train end
    assert all(is_nm_sparse(model.model.layers[i].self_attn.q_proj.weight, 2, 4) for i in range(2))
    assert len(callback.history) == 3
    assert [h for h in trainer.state.log_history if "sste/mask_flips" in h]


def test_driver_restores_frozen_beta():
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    driver = SSTEDriver()
    driver.setup(model, None, None)
    saved = driver.state_dict()
    name = next(iter(saved["betas"]))
    resumed = tiny_causal_lm(seed=0, num_hidden_layers=2)  # reloaded from a checkpoint: plain nn.Linear again
    with torch.no_grad():  # training moved the weights: a fresh β would differ
        w = resumed.get_submodule(name).weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
    again = SSTEDriver()
    again.setup(resumed, None, None)
    assert float(again.layers[name].sste_scale) != pytest.approx(saved["betas"][name])
    again.load_state_dict(saved)
    assert float(again.layers[name].sste_scale) == pytest.approx(saved["betas"][name])


# ------------------------------------------------------------------------------------------------------- resume


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _resumable(out, make_callback, stop=None, resume=None):
    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    callback = make_callback()
    args = training_args(out, max_steps=4, learning_rate=5e-2, save_strategy="steps", save_steps=2, logging_steps=2)
    callbacks = [callback] + ([_StopAt(stop)] if stop else [])
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(32), data_collator=collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, {n: float(m.sste_scale) for n, m in sste_layers(model).items()}


@pytest.mark.parametrize(
    "make_callback", [SSTECallback, lambda: PruneCallback(method="s-ste")], ids=["SSTECallback", "PruneCallback"]
)
def test_resume_keeps_the_frozen_beta_and_equals_uninterrupted(tmp_path, make_callback):
    full, full_betas = _resumable(tmp_path / "full", make_callback)
    _resumable(tmp_path / "split", make_callback, stop=2)
    ckpt = tmp_path / "split" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed, resumed_betas = _resumable(tmp_path / "split", make_callback, resume=str(ckpt))
    # β frozen at the original start; a β recomputed from the step-2 weights would differ
    fresh = {n: float(sste_scale(m.weight)) for n, m in sste_layers(resumed).items()}
    assert resumed_betas == full_betas and len(full_betas) == 14
    assert any(abs(fresh[n] - full_betas[n]) > 1e-6 for n in full_betas)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_plain_loop_betas_round_trip_and_refuse_unknown_layers():
    model = tiny_causal_lm(seed=0, num_hidden_layers=1)
    apply_sste(model)
    saved = sste_betas(model)
    with torch.no_grad():
        for m in sste_layers(model).values():
            m.weight.mul_(1.5).add_(0.01)
    again = tiny_causal_lm(seed=0, num_hidden_layers=1)
    apply_sste(again)
    load_sste_betas(again, saved)
    assert sste_betas(again) == saved
    with pytest.raises(ValueError, match="not S-STE layers"):
        load_sste_betas(again, {"model.nope": 1.0})
