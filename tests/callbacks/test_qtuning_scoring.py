"""Two-pass Q-Tuning scoring: inference mode, chunked scoring across micro-batches, half-precision scoring."""

import pytest
import torch
from test_qtuning_trainer import CPU, make_batch, make_trainer

from prune_peft.callbacks.qtuning import QTuningCallback, QTuningConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score_batch_size": 0}, "score_batch_size must be None or an integer >= 1, got 0"),
        ({"score_batch_size": True}, "score_batch_size"),
        ({"score_batch_size": "8"}, "score_batch_size"),
        ({"score_dtype": "int8"}, r"score_dtype must be None or one of \['float32', 'bfloat16', 'float16'\]"),
        ({"mode": "single_pass", "score_batch_size": 8}, "mode='single_pass' scores from the training forward"),
        ({"mode": "single_pass", "score_dtype": "bfloat16"}, "mode='single_pass'"),
    ],
)
def test_scoring_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QTuningConfig(**kwargs)


def _trainer(tmp_path, tiny_model, **cfg):
    torch.manual_seed(0)
    cb = QTuningCallback(QTuningConfig(sample_ratio=0.5, token_ratio=0.5, plot=False, **cfg))
    return make_trainer(tmp_path, tiny_model(), cb, bs=3, ga=3)


def test_scores_come_from_inference_mode_without_dropout(tmp_path, tiny_model, tokenizer):
    trainer = _trainer(tmp_path, tiny_model)
    trainer.model.train()
    batch = make_batch(tokenizer, 3, seed=1)
    ((nll, ent, mask),) = trainer.qtuning_score_batches([batch])
    assert nll.is_inference() and ent.is_inference()
    assert trainer.model.training  # the training mode is restored
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from prune_peft.sparsity.qtuning import token_nll_entropy

    ref_nll, ref_ent, ref_mask = token_nll_entropy(logits, batch["labels"])
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)


def test_chunked_scoring_across_micro_batches_matches_per_micro_batch(tmp_path, tiny_model, tokenizer):
    # three micro-batches of different lengths
    batches = [
        {k: v[:, :cut] for k, v in make_batch(tokenizer, 3, seed=s).items()} for s, cut in enumerate((90, 111, 75))
    ]
    assert len({b["labels"].size(1) for b in batches}) == 3
    per = _trainer(tmp_path / "a", tiny_model).qtuning_score_batches([dict(b) for b in batches])
    chunked = _trainer(tmp_path / "b", tiny_model, score_batch_size=5).qtuning_score_batches(
        [dict(b) for b in batches]
    )
    for (n1, e1, m1), (n2, e2, m2), b in zip(per, chunked, batches):
        assert n2.shape == (3, b["labels"].size(1) - 1)  # cut back to the micro-batch's own length
        assert torch.equal(m1, m2)
        torch.testing.assert_close(n1, n2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(e1, e2, rtol=1e-4, atol=1e-4)


def test_chunked_scoring_keeps_the_same_samples(tmp_path, tiny_model, tokenizer):
    batches = [
        {k: v[:, :cut] for k, v in make_batch(tokenizer, 3, seed=s).items()} for s, cut in enumerate((90, 111, 75))
    ]
    plans = []
    for name, cfg in (("a", {}), ("b", {"score_batch_size": 9})):
        trainer = _trainer(tmp_path / name, tiny_model, **cfg)
        pruned, num_items = trainer.get_batch_samples(iter([dict(b) for b in batches]), 3, CPU)
        plans.append(([p["labels"].tolist() for p in pruned], int(num_items)))
    assert plans[0] == plans[1]


def test_bf16_scoring_is_close_to_float32_and_training_runs_after_it(tmp_path, tiny_model, tokenizer):
    batch = make_batch(tokenizer, 3, seed=2)
    ((n32, e32, _),) = _trainer(tmp_path / "a", tiny_model).qtuning_score_batches([dict(batch)])
    trainer = _trainer(tmp_path / "b", tiny_model, score_dtype="bfloat16")
    ((n16, e16, _),) = trainer.qtuning_score_batches([dict(batch)])
    assert n16.dtype == torch.float32  # log-softmax in float32 on top of the bf16 forward
    assert not torch.equal(n16, n32)  # the forward really ran in bf16
    torch.testing.assert_close(n16, n32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(e16, e32, rtol=0.05, atol=0.05)
    # the model's parameters are untouched by scoring: a training step after it gets gradients
    loss = trainer.model(**batch).loss
    loss.backward()
    assert any(p.grad is not None for p in trainer.model.parameters())
