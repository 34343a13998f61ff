"""Q-Tuning in transformers.Trainer and trl.SFTTrainer through QTuningTrainerMixin (tiny models, a few steps)."""

import math
import os
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from prune_peft.callbacks.qtuning import (
    QTuningCallback,
    QTuningConfig,
    QTuningSFTTrainer,
    QTuningTrainer,
    QTuningTrainerMixin,
)
from prune_peft.sft_data import arithmetic_problems, to_messages
from prune_peft.sparsity.qtuning import sample_ppl_entropy, select_samples, select_tokens, token_nll_entropy

CPU = torch.device("cpu")


def make_batch(tokenizer, n, seed=0, empty_rows=()):
    """Right-padded prompt+completion batch; labels −100 on the prompt and the padding."""
    ds = arithmetic_problems(n, seed=seed)
    rows = []
    for i, (p, c) in enumerate(zip(ds["prompt"], ds["completion"])):
        pi = tokenizer(p[:60], add_special_tokens=False)["input_ids"]
        ci = tokenizer(c[:50], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        lab = [-100] * len(pi) + (ci if i not in empty_rows else [-100] * len(ci))
        rows.append((pi + ci, lab))
    length = max(len(r[0]) for r in rows)
    ids = torch.zeros(n, length, dtype=torch.long)
    att = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100)
    for i, (x, lab) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        labels[i, : len(x)] = torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def make_trainer(tmp_path, model, callback, bs=4, ga=1, trainer_cls=QTuningTrainer, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    callbacks = callback if isinstance(callback, list) else [callback]
    return trainer_cls(model=model, args=args, callbacks=callbacks, **kwargs)


def oracle_keep(model, batches, sample_ratio, token_ratio, lam=0.5):
    """Per batch: (token keep mask [B, L−1], token NLL [B, L−1]) from the definitions, pooled selection."""
    stats = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            stats.append(token_nll_entropy(logits, b["labels"]))
    ppl, ent = zip(*(sample_ppl_entropy(*s) for s in stats))
    keep, quad = select_samples(torch.cat(ppl), torch.cat(ent), sample_ratio)
    out, start = [], 0
    for nll, _, mask in stats:
        n = nll.size(0)
        k, q = keep[start : start + n], quad[start : start + n]
        start += n
        tok = mask & k[:, None]
        mis = q == 2
        tok[mis] = select_tokens(nll[mis], mask[mis], token_ratio, lam)
        out.append((tok, nll, q))
    return out, keep, quad


def test_single_pass_loss_is_hand_computed_masked_mean(tmp_path, tiny_model, tokenizer):
    model = tiny_model()
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, mode="single_pass", plot=False)
    trainer = make_trainer(tmp_path, model, cb, bs=8)
    assert cb.trainer is trainer  # bound by the mixin from callbacks= alone
    # only documented extension points: the trainer's methods are its class's, none set on the instance
    assert not {"compute_loss", "get_batch_samples", "log", "_qtuning_callback"} & set(vars(trainer))
    batch = make_batch(tokenizer, 8)
    [(tok, nll, _)], keep, _ = oracle_keep(model, [batch], 0.5, 0.5)
    expected = nll[tok].sum() / tok.sum()
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    n_items = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert cb.records[-1]["keep"] == keep.tolist()
    loss.backward()  # differentiable
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_two_pass_prunes_batches_and_keeps_exact_normalisation_under_grad_accumulation(
    tmp_path, tiny_model, tokenizer
):
    model = tiny_model()
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, plot=False)  # two_pass is the default
    trainer = make_trainer(tmp_path, model, cb, bs=4, ga=2)
    batches = [make_batch(tokenizer, 4, seed=0), make_batch(tokenizer, 4, seed=1)]
    plan, keep, _ = oracle_keep(model, batches, 0.5, 0.5)
    model.train()
    pruned, num_items = trainer.get_batch_samples(iter([dict(b) for b in batches]), 2, CPU)
    assert cb.records[-1]["keep"] == keep.tolist()  # one rule over both micro-batches
    assert len(pruned) == 2
    # labels: dropped rows removed, calibration rows untouched, misconception rows keep ⌈r·n⌉ of their tokens
    for b, pb, (_, _, q), start in zip(batches, pruned, plan, (0, 4)):
        rows = keep[start : start + 4].nonzero().squeeze(1)
        assert pb["input_ids"].size(0) == rows.numel()
        for j, r in enumerate(rows.tolist()):
            orig = b["labels"][r]
            new = pb["labels"][j]
            resp = int((orig != -100).sum())
            if q[r] == 4:
                assert torch.equal(new, orig[: new.numel()]) and int((new != -100).sum()) == resp
            else:
                assert q[r] == 2 and int((new != -100).sum()) == math.ceil(resp * 0.5)
                assert ((new == orig[: new.numel()]) | (new == -100)).all()  # only ever set to -100
            assert torch.equal(pb["input_ids"][j], b["input_ids"][r, : new.numel()])  # context unchanged
    assert int(num_items) == sum(int(t.sum()) for t, _, _ in plan)
    trainer.current_gradient_accumulation_steps = 2
    total = sum(trainer.compute_loss(model, dict(pb), num_items_in_batch=num_items) for pb in pruned)
    expected = sum(nll[t].sum() for t, nll, _ in plan) / sum(t.sum() for t, _, _ in plan)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_two_pass_and_single_pass_select_the_same_samples(tmp_path, tiny_model, tokenizer):
    batch = make_batch(tokenizer, 8, seed=3)
    model = tiny_model(seed=1)
    two = QTuningCallback(sample_ratio=0.25, token_ratio=0.5, plot=False)
    make_trainer(tmp_path / "a", model, two, bs=8).get_batch_samples(iter([dict(batch)]), 1, CPU)
    one = QTuningCallback(sample_ratio=0.25, token_ratio=0.5, mode="single_pass", plot=False)
    trainer = make_trainer(tmp_path / "b", model, one, bs=8)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.compute_loss(model, dict(batch))
    a, b = two.records[-1], one.records[-1]
    assert a["keep"] == b["keep"] and a["quadrant"] == b["quadrant"] and sum(a["keep"]) == 2
    assert torch.allclose(torch.tensor(a["log_ppl"]), torch.tensor(b["log_ppl"]), atol=1e-5)


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard/W&B): what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _sft_args(tmp_path, **kw):
    from trl import SFTConfig

    base = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=160,
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_sft_trainer_lora_two_pass_end_to_end(tmp_path, tiny_model, tokenizer):
    from peft import LoraConfig

    rec = Recorder()
    cb = QTuningCallback(sample_ratio=0.25, token_ratio=0.5, plot_steps=1)
    trainer = QTuningSFTTrainer(
        tiny_model(num_hidden_layers=2),
        args=_sft_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=arithmetic_problems(16).remove_columns("answer"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[cb, rec],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h, seen in zip(logs, rec.logs):
        assert h["qtuning/kept_sample_share"] == 0.25  # 2 of the step's 8 samples
        assert h["qtuning/q2_misconception"] + h["qtuning/q4_calibration"] == 2
        assert (
            sum(h[f"qtuning/q{q}_{n}"] for q, n in [(1, "noise"), (2, "misconception"), (3, "redundant")])
            + h["qtuning/q4_calibration"]
            == 8
        )
        assert 0 < h["qtuning/kept_token_share"] <= 0.25 and math.isfinite(h["loss"])
        assert seen["qtuning/kept_sample_share"] == 0.25  # reached the reporters too
    plots = sorted(os.listdir(tmp_path / "qtuning"))
    assert plots == ["eu_plane_step000001.png", "eu_plane_step000002.png"]


def test_sft_trainer_single_pass_conversational_completion_only(tmp_path, tiny_model, tokenizer):
    data = to_messages(arithmetic_problems(8).remove_columns("answer"))
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, mode="single_pass", plot=False)
    trainer = QTuningSFTTrainer(
        tiny_model(num_hidden_layers=2),
        args=_sft_args(tmp_path, max_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[cb],
    )
    trainer.train()
    (h,) = [h for h in trainer.state.log_history if "loss" in h]
    assert h["qtuning/kept_sample_share"] == 0.5 and math.isfinite(h["loss"])
    # the scored tokens are the completions only (prompt labels are -100 in trl's completion-only loss)
    rec = cb.records[-1]
    assert len(rec["keep"]) == 4 and all(math.isfinite(x) for x in rec["log_ppl"])


def test_sft_trainer_two_pass_assistant_only_loss(tmp_path, tiny_model):
    from datasets import Dataset

    from prune_peft.testing import byte_tokenizer

    tok = byte_tokenizer()  # a template with generation markers, so trl can build assistant masks
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}</s>{% endif %}\n{% endfor %}"
    )
    ds = arithmetic_problems(8)
    data = Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p[:60]}, {"role": "assistant", "content": c}]
                for p, c in zip(ds["prompt"], ds["completion"])
            ]
        }
    )
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, plot=False)
    trainer = QTuningSFTTrainer(
        tiny_model(num_hidden_layers=2),
        args=_sft_args(tmp_path, max_steps=1, assistant_only_loss=True),
        train_dataset=data,
        processing_class=tok,
        callbacks=[cb],
    )
    row = trainer.train_dataset[0]
    n_assistant = len(tok(ds["completion"][0] + "</s>", add_special_tokens=False)["input_ids"])
    assert sum(x != -100 for x in row["labels"]) in (n_assistant, n_assistant - 1)  # trl masked the user turn
    trainer.train()
    (h,) = [h for h in trainer.state.log_history if "loss" in h]
    assert h["qtuning/kept_sample_share"] == 0.5 and math.isfinite(h["loss"])
    assert 0 < h["qtuning/kept_token_share"] < 1
    if h["qtuning/q2_misconception"]:  # ⌈n/2⌉ of each misconception sample's assistant tokens
        assert 0.5 <= h["qtuning/misconception_token_share"] <= 0.55


def test_add_callback_after_construction_binds_at_train(tmp_path, tiny_model, tokenizer):
    class ListData(torch.utils.data.Dataset):
        def __init__(self, batch):
            self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    model = tiny_model(num_hidden_layers=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = QTuningTrainer(
        model=model, args=args, train_dataset=ListData(make_batch(tokenizer, 8)), data_collator=collate
    )
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.7, plot=False)
    trainer.add_callback(cb)
    assert cb.trainer is None
    trainer.train()
    assert cb.trainer is trainer
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["qtuning/kept_sample_share"] for h in logs] == [0.5, 0.5]


# ------------------------------------------------------------------ bad input


def test_batch_size_one_single_pass_is_rejected_at_construction(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"no selection is possible.*per_device_train_batch_size >= 2"):
        make_trainer(tmp_path, tiny_model(), QTuningCallback(mode="single_pass"), bs=1)
    with pytest.raises(ValueError, match="no selection is possible"):
        make_trainer(tmp_path, tiny_model(), QTuningCallback(), bs=1, ga=1)
    # two-pass pools the accumulated micro-batches: batch size 1 with accumulation is fine
    make_trainer(tmp_path, tiny_model(), QTuningCallback(), bs=1, ga=4)
    # and token pruning only (sample_ratio=1) needs no pool
    make_trainer(tmp_path, tiny_model(), QTuningCallback(sample_ratio=1.0, mode="single_pass"), bs=1)


def test_incompatible_trainer_settings_are_rejected(tmp_path, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="packing=True mixes samples"):
        QTuningSFTTrainer(
            tiny_model(num_hidden_layers=1),
            args=_sft_args(tmp_path, packing=True),
            train_dataset=arithmetic_problems(8).remove_columns("answer"),
            processing_class=tokenizer,
            callbacks=[QTuningCallback()],
        )
    with pytest.raises(ValueError, match=r"single_pass.*compute_loss_func"):
        make_trainer(
            tmp_path, tiny_model(), QTuningCallback(mode="single_pass"), compute_loss_func=lambda o, la, **k: o.loss
        )
    with pytest.raises(ValueError, match="the trainer has 2 QTuningCallbacks; use only one"):
        make_trainer(tmp_path, tiny_model(), [QTuningCallback(), QTuningCallback()])
    cb = QTuningCallback()
    make_trainer(tmp_path, tiny_model(), cb)
    with pytest.raises(ValueError, match="already serves another trainer"):
        make_trainer(tmp_path, tiny_model(), cb)


def test_batches_without_response_tokens(tmp_path, tiny_model, tokenizer):
    model = tiny_model()
    cb = QTuningCallback(sample_ratio=0.5, token_ratio=0.5, plot=False)
    trainer = make_trainer(tmp_path, model, cb, bs=4)
    model.train()
    with pytest.raises(ValueError, match="no sample in the batch has response tokens"):
        trainer.get_batch_samples(iter([make_batch(tokenizer, 4, empty_rows=range(4))]), 1, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.get_batch_samples(iter([make_batch(tokenizer, 4, empty_rows=[1])]), 1, CPU)
    assert any("no response tokens" in str(w.message) for w in caught)
    rec = cb.records[-1]
    assert rec["quadrant"][1] == 0 and not rec["keep"][1] and sum(rec["keep"]) == 2  # 50 % of the 3 valid rows


def test_plain_trainer_with_the_callback_is_rejected_at_train_begin(tmp_path, tiny_model, tokenizer):
    from trl import SFTTrainer

    model = tiny_model(num_hidden_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    rows = [{k: v[i] for k, v in make_batch(tokenizer, 4).items()} for i in range(4)]
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[QTuningCallback(plot=False)])
    with pytest.raises(ValueError, match=r"QTuningTrainerMixin.*QTuningTrainer.*QTuningSFTTrainer"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # rejected before any step
    sft = SFTTrainer(
        tiny_model(num_hidden_layers=1),
        args=_sft_args(tmp_path / "sft", max_steps=1),
        train_dataset=arithmetic_problems(8).remove_columns("answer"),
        processing_class=tokenizer,
        callbacks=[QTuningCallback(plot=False)],
    )
    with pytest.raises(ValueError, match="a TrainerCallback cannot do that"):
        sft.train()


def test_mixin_without_the_callback_is_the_plain_trainer(tmp_path, tiny_model, tokenizer):
    model = tiny_model()
    mixed = make_trainer(tmp_path / "a", model, [])
    plain = make_trainer(tmp_path / "b", model, [], trainer_cls=Trainer)
    assert isinstance(mixed, QTuningTrainerMixin) and mixed.qtuning_callback is None
    batches = [make_batch(tokenizer, 4, seed=0), make_batch(tokenizer, 4, seed=1)]
    got, n_got = mixed.get_batch_samples(iter([dict(b) for b in batches]), 2, CPU)
    ref, n_ref = plain.get_batch_samples(iter([dict(b) for b in batches]), 2, CPU)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(got, ref)) and n_got == n_ref
    model.train()
    for t in (mixed, plain):
        t.current_gradient_accumulation_steps = 1
    loss_mixed = mixed.compute_loss(model, dict(batches[0]), num_items_in_batch=n_got)
    loss_plain = plain.compute_loss(model, dict(batches[0]), num_items_in_batch=n_ref)
    assert loss_mixed.item() == loss_plain.item()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_config_ratios_are_rejected(bad):
    with pytest.raises(ValueError, match="sample_ratio must be a number in \\(0, 1\\]"):
        QTuningConfig(sample_ratio=bad)
    with pytest.raises(ValueError, match="token_ratio must be a number in \\(0, 1\\]"):
        QTuningConfig(token_ratio=bad)


def test_other_config_fields_are_validated():
    with pytest.raises(ValueError, match="mode must be one of \\['two_pass', 'single_pass'\\]"):
        QTuningConfig(mode="fast")
    with pytest.raises(ValueError, match="lam must be a number in \\[0, 1\\]"):
        QTuningConfig(lam=1.5)
    with pytest.raises(ValueError, match="token_keep must be 'low' or 'high'"):
        QTuningConfig(token_keep="middle")
    with pytest.raises(ValueError, match="plot_steps"):
        QTuningConfig(plot_steps=-1)
    with pytest.raises(ValueError, match="sample_ratio"):
        QTuningCallback(sample_ratio=2.0)
    assert QTuningCallback(QTuningConfig(sample_ratio=0.25), token_ratio=0.5).config.token_ratio == 0.5
