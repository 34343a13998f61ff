import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from prune_peft.distill import LogitDistillation, TeacherTopK, kd_loss, precompute_teacher_topk
from prune_peft.distill.kd import causal_ce


def _np_log_softmax(z):
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


def _hand_kd(student, teacher, labels, tau, denom=None):
    """τ² Σ_positions KL(softmax(t/τ) ‖ softmax(s/τ)) in float64 loops; position t scored if labels[t+1] != -100."""
    s, t = student.double().numpy(), teacher.double().numpy()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for pos in range(s.shape[1] - 1):
            if labels[b, pos + 1] == -100:
                continue
            lq, lp = _np_log_softmax(t[b, pos] / tau), _np_log_softmax(s[b, pos] / tau)
            total += float((np.exp(lq) * (lq - lp)).sum())
            count += 1
    return tau * tau * total / (denom if denom is not None else count)


def _example(seed=0, B=2, T=6, V=11):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt tokens
    labels[1, -1] = -100
    return student, teacher, labels


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_kd_loss_matches_hand_computed_kl(tau):
    student, teacher, labels = _example()
    got = kd_loss(student, teacher, labels, temperature=tau).item()
    assert got == pytest.approx(_hand_kd(student, teacher, labels, tau), rel=1e-5)
    # the Trainer's num_items_in_batch replaces the per-batch count
    got = kd_loss(student, teacher, labels, temperature=tau, num_items_in_batch=17).item()
    assert got == pytest.approx(_hand_kd(student, teacher, labels, tau, denom=17), rel=1e-5)


def test_kd_loss_zero_for_identical_logits_and_without_labels():
    student, _, labels = _example()
    assert kd_loss(student, student.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    no_labels = torch.zeros(2, 6, dtype=torch.long)  # all positions but the last scored
    _, teacher, _ = _example(1)
    assert kd_loss(student, teacher, None).item() == pytest.approx(kd_loss(student, teacher, no_labels).item())


def test_topk_kd_equals_full_kd_for_k_equal_vocab_and_hand_formula_otherwise():
    student, teacher, labels = _example(2)
    vals, idx = teacher.topk(11, dim=-1)
    full = kd_loss(student, teacher, labels, temperature=2.0)
    assert kd_loss(student, labels=labels, temperature=2.0, topk_ids=idx, topk_logits=vals).item() == pytest.approx(
        full.item(), rel=1e-5
    )
    vals, idx = teacher.topk(3, dim=-1)
    got = kd_loss(student, labels=labels, temperature=2.0, topk_ids=idx, topk_logits=vals).item()
    s, v, ix = student.double().numpy(), vals.double().numpy(), idx.numpy()
    total, count = 0.0, 0
    for b in range(2):
        for pos in range(5):
            if labels[b, pos + 1] == -100:
                continue
            lq = _np_log_softmax(v[b, pos] / 2.0)  # teacher renormalised over its top-3
            lp = _np_log_softmax(s[b, pos] / 2.0)[ix[b, pos]]  # student's full-vocab log-probs at those ids
            total += float((np.exp(lq) * (lq - lp)).sum())
            count += 1
    assert got == pytest.approx(4.0 * total / count, rel=1e-5)


def test_causal_ce_matches_torch_reference():
    student, _, labels = _example(3)
    ref = torch.nn.functional.cross_entropy(
        student[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert causal_ce(student, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_logit_distillation_mixes_ce_and_kd(tiny_model):
    student = tiny_model("llama", seed=0)
    teacher = tiny_model("llama", seed=1)
    ids = torch.randint(3, 259, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    kd = LogitDistillation(student, teacher, temperature=2.0, weight=0.3)
    out = student(input_ids=ids, attention_mask=torch.ones_like(ids))
    loss = kd(out, labels, num_items_in_batch=10)
    with torch.no_grad():
        t_logits = teacher(ids).logits
    expected = 0.7 * causal_ce(out.logits, labels, 10) + 0.3 * kd_loss(
        out.logits, t_logits, labels, temperature=2.0, num_items_in_batch=10
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.lm_head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    kd.remove()


def _tokenized(tokenizer, n=8):
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Q{i}: add {i} and {i}? ", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"{2 * i}</s>", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return Dataset.from_list(rows)


def _train(model, dataset, tokenizer, tmp_path, compute_loss_func, steps=2, **extra):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **extra,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_uses_the_distillation_loss(tiny_model, tokenizer, tmp_path):
    student = tiny_model("llama", seed=0)
    teacher = copy.deepcopy(student)
    kd = LogitDistillation(student, teacher, temperature=2.0, weight=1.0)
    losses = _train(student, _tokenized(tokenizer), tokenizer, tmp_path, kd)
    # pure KD against an identical teacher: zero at step 1 (plain CE of a random model would be ≈ log 260 ≈ 5.6)
    assert losses[0] == pytest.approx(0.0, abs=1e-5)
    assert set(kd.last) == {"ce", "kd"} and kd.last["ce"] > 3.0


def test_precomputed_topk_with_trainer_and_peft(tiny_model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=0)
    teacher = copy.deepcopy(base)
    data = _tokenized(tokenizer)
    topk = precompute_teacher_topk(teacher, data, k=260, batch_size=3)
    assert len(topk) == len(data)
    topk.save(str(tmp_path / "topk"))
    topk = TeacherTopK.load(str(tmp_path / "topk"))
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    kd = LogitDistillation(student, topk=topk, temperature=1.0, weight=1.0)
    losses = _train(student, data, tokenizer, tmp_path, kd, steps=1)
    assert losses[0] == pytest.approx(0.0, abs=1e-5)  # LoRA starts at ΔW = 0: student == teacher
    other = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="no precomputed teacher logits for a training sequence"):
        topk.lookup(other, None)


def test_sft_trainer_one_line(tiny_model, tokenizer, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    base = tiny_model("llama", seed=0)
    teacher = copy.deepcopy(base)
    ds = Dataset.from_list([{"prompt": f"Q{i}: {i}+{i}=", "completion": f"{2 * i}"} for i in range(8)])
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=64,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        compute_loss_func=LogitDistillation(base, teacher, temperature=2.0, weight=1.0),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of teacher="),
        ({"teacher": "t", "topk": TeacherTopK(2)}, "exactly one of teacher="),
        ({"topk": TeacherTopK(2), "weight": 1.5}, r"weight must be in \[0, 1\]"),
        ({"topk": TeacherTopK(2), "temperature": 0}, "temperature must be > 0"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitDistillation(tiny_model("llama"), **kwargs)
