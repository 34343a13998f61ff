"""PruneCallback driving LoRAPrune (and the other drivers) from the transformers Trainer."""

from types import SimpleNamespace

import pytest
import torch
from prune_testlib import collate, loraprune_model, token_rows, training_args
from transformers import Trainer, TrainerCallback

from prune_peft import PruneCallback, register_driver
from prune_peft.callbacks._trainer import PruneTrainerMixin
from prune_peft.callbacks.prune import DRIVERS, LoRAPruneDriver, PruneDriver
from prune_peft.sparsity.loraprune import n_pruned
from prune_peft.testing import tiny_causal_lm


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard/W&B): records what on_log delivers."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class PruneTrainer(PruneTrainerMixin, Trainer):
    """The documented way for reporters to receive prune_peft metrics."""


def _train(model, out, callbacks, trainer_cls=PruneTrainer, **kw):
    trainer = trainer_cls(
        model=model,
        args=training_args(out, **kw),
        train_dataset=token_rows(),
        data_collator=collate,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _prune_cb(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PruneCallback))


# ----------------------------------------------------------------------------------------------------- importance


def _oracle_block_scores(layers, adapter="default", n_heads=4, n_kv=2, hd=16):
    """Independent per-unit / per-channel scores: one-SGD-step Ĝ, explicit head → KV-unit loops."""

    def element_imp(layer):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        gA, gB = A.grad, B.grad
        g_hat = -((B - gB) @ (A - gA) - B @ A)
        merged = layer.get_base_layer().weight + layer.scaling[adapter] * B @ A
        return (g_hat * merged).abs().detach()

    def norm(v):
        return v / (v.norm() + 1e-8)

    units = torch.zeros(n_kv)
    per_q_unit = n_heads // n_kv
    for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
        imp = element_imp(layers[role])
        vec = torch.zeros(n_kv)
        if role == "o_proj":
            for col in range(imp.shape[1]):
                vec[(col // hd) // per_q_unit] += imp[:, col].sum()
        elif role == "q_proj":
            for row in range(imp.shape[0]):
                vec[(row // hd) // per_q_unit] += imp[row].sum()
        else:
            for row in range(imp.shape[0]):
                vec[row // hd] += imp[row].sum()
        units += norm(vec)
    channels = norm(element_imp(layers["gate_proj"]).sum(1)) + norm(element_imp(layers["up_proj"]).sum(1))
    channels += norm(element_imp(layers["down_proj"]).sum(0))
    return units, channels


def test_importance_matches_an_independent_oracle():
    model = loraprune_model()
    batch = collate(token_rows(4))
    model(**batch).loss.backward()
    (driver,) = LoRAPruneDriver.discover(model)
    state = SimpleNamespace(max_steps=10, global_step=0)
    driver.setup(model, None, state)
    driver.accumulate(model, state)
    for block in (1, 2):  # the moving average starts at zero (reference update_sensitivity_dict): Ī = 0.1 I
        units, channels = _oracle_block_scores(model.base_model.prune_blocks()[block].layers)
        torch.testing.assert_close(driver.importance[f"u{block}"], 0.1 * units, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(driver.importance[f"c{block}"], 0.1 * channels, rtol=1e-4, atol=1e-7)
    assert "u0" not in driver.importance  # excluded block: not scored
    # the moving average: Ī ← 0.9 Ī + 0.1 I
    first = driver.importance["u1"].clone()
    model.zero_grad()
    model(**collate(token_rows(4, seed=5))).loss.backward()
    new_units, _ = _oracle_block_scores(model.base_model.prune_blocks()[1].layers)
    driver.accumulate(model, state)
    torch.testing.assert_close(driver.importance["u1"], 0.9 * first + 0.1 * new_units, rtol=1e-4, atol=1e-6)


def test_importance_is_the_same_under_gradient_accumulation(tmp_path):
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        model = loraprune_model()
        trainer = _train(
            model, tmp_path / f"ga{ga}", [PruneCallback()], max_steps=1, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, max_grad_norm=0.0,
        )  # fmt: skip
        results.append(_prune_cb(trainer).drivers[0].importance)
    assert set(results[0]) == set(results[1]) and results[0]
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------- schedule, metrics


def test_trainer_run_reaches_target_exactly_and_logs_metrics(tmp_path):
    model = loraprune_model(target_sparsity=0.3, prune_every=3)
    recorder = Recorder()
    trainer = _train(model, tmp_path, [recorder, PruneCallback()], max_steps=10)
    masks = model.base_model.get_masks()
    assert set(masks) == {1, 2}
    for m in masks.values():
        assert int((~m["units"]).sum()) == n_pruned(0.3, 2) == 1
        assert int((~m["channels"]).sum()) == n_pruned(0.3, 128) == 38
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 10
    keys = {"prune/target_sparsity", "prune/attention_sparsity", "prune/mlp_sparsity", "prune/pruned_heads",
            "prune/pruned_channels", "prune/param_sparsity", "prune/importance_mean"}  # fmt: skip
    assert keys <= set(train_logs[-1])
    assert train_logs[-1]["prune/target_sparsity"] == pytest.approx(0.3)
    assert train_logs[-1]["prune/pruned_heads"] == 4  # 2 pruned blocks × 1 unit × 2 query heads
    assert train_logs[-1]["prune/pruned_channels"] == 76
    assert train_logs[0]["prune/pruned_channels"] == 0  # warmup: nothing yet
    levels = [h["prune/mlp_sparsity"] for h in train_logs]
    assert levels == sorted(levels) and levels[-1] == pytest.approx(38 / 128)
    # the reporter (registered *before* PruneCallback) received the metrics too, through PruneTrainerMixin
    assert keys <= set(recorder.logs[-2]) and recorder.logs[-2]["prune/pruned_channels"] == 76
    # and the callback list was left in the order the user gave
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, (Recorder, PruneCallback))]
    assert [type(cb) for cb in ours] == [Recorder, PruneCallback]
    # and the masks really act: a masked channel's gate/up outputs are zero
    block = model.base_model.prune_blocks()[1]
    x = torch.randn(1, 3, 64)
    cut = ~masks[1]["channels"]
    assert block.layers["gate_proj"](x)[..., cut].abs().max() == 0


def test_without_the_mixin_metrics_still_reach_log_history(tmp_path):
    model = loraprune_model(target_sparsity=0.3, prune_every=3)
    recorder = Recorder()
    trainer = _train(model, tmp_path, [recorder, PruneCallback()], trainer_cls=Trainer, max_steps=10)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 10
    assert train_logs[-1]["prune/pruned_channels"] == 76 and train_logs[-1]["prune/target_sparsity"] == 0.3
    assert "prune/pruned_channels" not in recorder.logs[-2]  # reporters before it run first: that is the mixin's job


def test_callback_arguments_override_the_config(tmp_path):
    model = loraprune_model(target_sparsity=0.5, prune_every=50)
    _train(model, tmp_path, [PruneCallback(target_sparsity=0.25, prune_every=1, warmup=0.0)], max_steps=4)
    m = model.base_model.get_masks()[1]
    assert int((~m["channels"]).sum()) == 32 and int((~m["units"]).sum()) == n_pruned(0.25, 2) == 1


# ------------------------------------------------------------------------------------------------------ bad input


def test_schedule_longer_than_training_fails_before_the_first_step(tmp_path):
    model = loraprune_model(schedule_steps=50)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=token_rows(),
                      data_collator=collate, callbacks=[PruneCallback()])  # fmt: skip
    with pytest.raises(ValueError, match="longer than training"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prune_every=0), "prune_every"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(warmup=0.7, cooldown=0.4), "warmup"),
        (dict(pruning_ratio=0.5), "unknown setting"),
        (dict(method="obs"), "method"),
        (dict(method="magnitude"), "target_sparsity"),
    ],
)
def test_bad_callback_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneCallback(**kwargs)


def test_no_adapter_and_no_method_is_a_clear_error(tmp_path):
    trainer = Trainer(model=tiny_causal_lm(num_hidden_layers=2), args=training_args(tmp_path, max_steps=2),
                      train_dataset=token_rows(), data_collator=collate, callbacks=[PruneCallback()])  # fmt: skip
    with pytest.raises(ValueError, match="method='magnitude'"):
        trainer.train()


def test_structure_cannot_be_overridden():
    model = loraprune_model()
    with pytest.raises(ValueError, match="structure"):
        LoRAPruneDriver.discover(model, structure="channel")


# ------------------------------------------------------------------------------------------------- other drivers


def test_gradual_magnitude_mode_on_a_plain_model(tmp_path):
    for structure, target in (("unstructured", 0.4), ("2:4", None)):
        model = tiny_causal_lm(num_hidden_layers=2)
        cb = PruneCallback(method="magnitude", target_sparsity=target, structure=structure, prune_every=2)
        trainer = _train(model, tmp_path / structure, [cb], max_steps=4)
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                zeros = int((lin.weight == 0).sum())
                if structure == "2:4":
                    from prune_peft.sparsity import is_nm_sparse

                    assert is_nm_sparse(lin.weight, 2, 4) and zeros == lin.weight.numel() // 2
                else:
                    assert zeros == n_pruned(0.4, lin.weight.numel())
        assert trainer.state.log_history[-2]["prune/sparsity"] == pytest.approx(0.5 if target is None else 0.4, 1e-3)


def test_sparse_adapter_monitor_logs_and_checks_at_save(tmp_path):
    from peft import get_peft_model

    from prune_peft import SparseLoraConfig, prune

    base = tiny_causal_lm(num_hidden_layers=2)
    prune(base, method="magnitude", sparsity=0.5)
    model = get_peft_model(base, SparseLoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    trainer = _train(model, tmp_path / "ok", [PruneCallback()], max_steps=2)
    assert trainer.state.log_history[0]["prune/sparse_adapter_sparsity"] == pytest.approx(0.5, abs=0.01)

    class Corrupt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
            with torch.no_grad():
                w[w == 0] = 1.0  # the frozen base loses its zeros

    with pytest.raises(RuntimeError, match="no longer matches"):
        _train(model, tmp_path / "bad", [PruneCallback(), Corrupt()], max_steps=2, save_strategy="steps", save_steps=1)


def test_registered_driver_is_discovered_and_driven(tmp_path):
    calls = []

    class Probe(PruneDriver):
        name = "probe-test"
        overrides = ("probe_level",)

        def __init__(self, level):
            self.level = level

        @classmethod
        def discover(cls, model, probe_level=1.0, **kw):
            return [cls(probe_level)]

        def accumulate(self, model, state):
            calls.append(("accumulate", state.global_step))

        def update(self, model, state):
            calls.append(("update", state.global_step))

        def metrics(self):
            return {"probe/level": self.level}

    register_driver(Probe)
    try:
        trainer = _train(tiny_causal_lm(num_hidden_layers=2), tmp_path, [PruneCallback(probe_level=0.25)],
                         max_steps=2)  # fmt: skip
    finally:
        DRIVERS.pop("probe-test")
    assert calls == [("accumulate", 0), ("update", 0), ("accumulate", 1), ("update", 1)]
    assert trainer.state.log_history[0]["probe/level"] == 0.25


def test_sharded_parameters_are_refused_before_training():
    model = loraprune_model()
    next(model.parameters()).ds_numel = 123  # what DeepSpeed ZeRO-3 puts on partitioned parameters
    (driver,) = LoRAPruneDriver.discover(model)
    with pytest.raises(ValueError, match="sharded"):
        driver.setup(model, None, SimpleNamespace(max_steps=10, global_step=0))
