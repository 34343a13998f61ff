"""DeepSpeed ZeRO-3 is refused by every method before the first step (DeepSpeed is not installed or tested here).

A ZeRO-3 model is simulated the way DeepSpeed marks it: every partitioned parameter carries ``ds_numel`` and
``ds_id`` (outside forward its data is an empty placeholder).
"""

import pytest
from prune_testlib import training_args
from transformers import TrainerControl, TrainerState

from prune_peft.callbacks import PruneCallback, SSTECallback, apply_sste
from prune_peft.testing import tiny_causal_lm


def zero3(model):
    for i, p in enumerate(model.parameters()):
        p.ds_numel, p.ds_id = p.numel(), i
    return model


def _begin(callback, model, tmp_path):
    state = TrainerState()
    state.max_steps = 4
    callback.on_train_begin(training_args(tmp_path), state, TrainerControl(), model=model)


def test_sste_refuses_zero3(tmp_path):
    with pytest.raises(ValueError, match="ZeRO-3"):
        apply_sste(zero3(tiny_causal_lm(num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"SSTECallback.*ZeRO-3"):
        _begin(SSTECallback(), zero3(tiny_causal_lm(num_hidden_layers=1)), tmp_path)
    with pytest.raises(ValueError, match=r"s-ste.*ZeRO-3"):
        _begin(PruneCallback(method="s-ste"), zero3(tiny_causal_lm(num_hidden_layers=1)), tmp_path)


def test_unsharded_model_is_not_refused(tmp_path):
    model = tiny_causal_lm(num_hidden_layers=1)
    _begin(SSTECallback(), model, tmp_path)  # the same calls pass without the ZeRO-3 marks
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "SSTELinear"


def test_qtuning_refuses_zero3(tmp_path):
    from prune_peft.callbacks.qtuning import QTuningCallback
    from prune_peft.callbacks.trainers import QTuningTrainer

    with pytest.raises(ValueError, match=r"QTuningCallback.*ZeRO-3"):
        QTuningTrainer(
            model=zero3(tiny_causal_lm(num_hidden_layers=1)),
            args=training_args(tmp_path),
            callbacks=[QTuningCallback(sample_ratio=0.5, plot=False)],
        )
    # DeepSpeed partitions the model inside train(): on_train_begin sees the wrapped model and refuses it too
    cb = QTuningCallback(sample_ratio=0.5, plot=False)
    trainer = QTuningTrainer(model=tiny_causal_lm(num_hidden_layers=1), args=training_args(tmp_path), callbacks=[cb])
    with pytest.raises(ValueError, match="ZeRO-3"):
        cb.on_train_begin(trainer.args, trainer.state, TrainerControl(), model=zero3(trainer.model))


def test_kd_refuses_zero3_student_or_teacher():
    from prune_peft.distill.kd import LogitDistillation

    with pytest.raises(ValueError, match=r"student.*ZeRO-3"):
        LogitDistillation(zero3(tiny_causal_lm(num_hidden_layers=1)), tiny_causal_lm(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"teacher.*ZeRO-3"):
        LogitDistillation(tiny_causal_lm(num_hidden_layers=1), zero3(tiny_causal_lm(num_hidden_layers=1)))


def _adapter_configs():
    from prune_peft import LoRAPruneConfig, SparseLoraConfig, SPPConfig

    return {
        "loraprune": LoRAPruneConfig(r=2),
        "sparse_lora": SparseLoraConfig(r=2, target_modules=["q_proj", "up_proj"]),
        "spp": SPPConfig(target_modules=["q_proj", "up_proj"]),
    }


@pytest.mark.parametrize("method", ["loraprune", "sparse_lora", "spp"])
def test_adapters_refuse_zero3_at_get_peft_model(method):
    from peft import get_peft_model

    from prune_peft import prune

    base = tiny_causal_lm(num_hidden_layers=1)
    if method != "loraprune":
        prune(base, method="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match="ZeRO-3"):
        get_peft_model(zero3(base), _adapter_configs()[method])


@pytest.mark.parametrize("method", ["loraprune", "sparse_lora", "spp"])
def test_prune_callback_refuses_zero3_at_train_begin(method, tmp_path):
    """Adapters created first and partitioned afterwards (what DeepSpeed does inside Trainer.train())."""
    from peft import get_peft_model

    from prune_peft import prune

    base = tiny_causal_lm(num_hidden_layers=2)  # LoRAPrune keeps block 0 dense by default
    if method != "loraprune":
        prune(base, method="magnitude", sparsity=0.5)
    model = zero3(get_peft_model(base, _adapter_configs()[method]))
    with pytest.raises(ValueError, match="ZeRO-3"):
        _begin(PruneCallback(), model, tmp_path)


def test_magnitude_driver_refuses_zero3(tmp_path):
    with pytest.raises(ValueError, match="ZeRO-3"):
        _begin(PruneCallback(method="magnitude", target_sparsity=0.5), zero3(tiny_causal_lm(num_hidden_layers=1)),
               tmp_path)  # fmt: skip


def test_zero3_marks_are_what_the_check_reads():
    from prune_peft._dist import refuse_zero3, sharding_kind

    model = tiny_causal_lm(num_hidden_layers=1)
    assert sharding_kind(model) is None
    refuse_zero3(model, "x")  # no marks: no error
    next(model.parameters()).ds_id = 0
    with pytest.raises(ValueError, match=r"x: .*'model.embed_tokens.weight' and 0 more"):
        refuse_zero3(model, "x")
