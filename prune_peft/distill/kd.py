"""Logit distillation while fine-tuning the pruned student (optional; Hinton et al., 2015, arXiv 1503.02531).

Per predicted token, with temperature τ and ``p^τ = softmax(z / τ)``:

    KD = τ² · KL(p_T^τ ‖ p_S^τ) = τ² · Σ_v p_T^τ(v) · (log p_T^τ(v) − log p_S^τ(v))

(the τ² keeps gradient magnitudes comparable across temperatures). The training loss is
``(1 − weight) · CE(student, labels) + weight · KD``, both summed over the tokens whose label is not −100 and
divided by ``num_items_in_batch`` (the Trainer's count over the whole accumulated batch) — so gradient
accumulation gives the same gradient as one big batch, as with the Trainer's own loss.

With precomputed **top-k** teacher logits (no teacher in memory while training), the teacher distribution is
renormalised over its top-k tokens ``K`` and the student's full-vocabulary log-probabilities are read at ``K``:
``τ² · Σ_{v∈K} q(v) (log q(v) − log p_S^τ(v))`` with ``q = softmax_K(z_T / τ)``; for ``k = V`` this is exact KD.

Wiring: a loss cannot be changed by a callback, so :class:`LogitDistillation` is a ``compute_loss_func`` (the
Trainer's and trl ``SFTTrainer``'s documented loss hook). That hook receives the outputs and labels but not the
inputs, so a forward pre-hook on the student's decoder records the ``input_ids`` / ``attention_mask`` the teacher
needs (the decoder, not the top-level model: peft calls the wrapped model's ``forward`` directly, bypassing hooks
on it)::

    trainer = SFTTrainer(model=student, ..., compute_loss_func=LogitDistillation(student, teacher, temperature=2.0))

Sharded teacher (docs/distributed.md): a teacher sharded with FSDP2 (``fully_shard`` per block and at the root) works
as is — its root forward gathers the shards, each rank scores its own rows, and every rank calls the teacher once per
micro-batch (the all-gathers line up). DeepSpeed ZeRO-3 students or teachers, and FSDP2-sharded models with
bitsandbytes layers, are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import refuse_sharded_bnb, refuse_zero3
from .._hf import find_decoder_blocks

__all__ = ["LogitDistillation", "TeacherTopK", "causal_ce", "kd_loss", "precompute_teacher_topk"]


def _prediction_mask(labels: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """[B, T] bool: position t is scored when labels[t+1] != -100 (logit t predicts token t+1)."""
    mask = torch.zeros(shape[:2], dtype=torch.bool, device=device)
    if labels is None:
        mask[:, :-1] = True
    else:
        mask[:, :-1] = labels[:, 1:].to(device) != -100
    return mask


def _denominator(mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return mask.sum().clamp(min=1).to(torch.float32)
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).clamp(min=1)


def causal_ce(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy, summed over labels != -100 and divided by ``num_items_in_batch`` (or their count)."""
    mask = _prediction_mask(labels, logits.shape, logits.device)
    targets = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
    targets[:, :-1] = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / _denominator(mask, num_items_in_batch)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    topk_ids: torch.Tensor | None = None,
    topk_logits: torch.Tensor | None = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """``τ² · KL(p_T^τ ‖ p_S^τ)`` summed over predicted positions (labels != −100, shifted) / ``num_items_in_batch``.

    Give either full ``teacher_logits`` [B, T, V] or ``topk_ids`` + ``topk_logits`` [B, T, k] (teacher logits or
    log-probs at its top-k tokens; the softmax over k makes the two equivalent). Without ``labels`` every
    position but the last is scored.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tau = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ in shape (same tokenizer and vocabulary needed)"
            )
        log_q = F.log_softmax(teacher_logits.to(log_p_s.device).float() / tau, dim=-1)
        per_pos = (log_q.exp() * (log_q - log_p_s)).sum(-1)
    elif topk_ids is not None and topk_logits is not None:
        ids = topk_ids.to(log_p_s.device).long()
        log_q = F.log_softmax(topk_logits.to(log_p_s.device).float() / tau, dim=-1)
        per_pos = (log_q.exp() * (log_q - log_p_s.gather(-1, ids))).sum(-1)
    else:
        raise ValueError("kd_loss needs teacher_logits, or topk_ids together with topk_logits")
    mask = _prediction_mask(labels, student_logits.shape, log_p_s.device)
    return tau * tau * (per_pos * mask).sum() / _denominator(mask, num_items_in_batch)


def _key(ids: Sequence[int] | torch.Tensor) -> str:
    t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


class TeacherTopK:
    """Precomputed top-k teacher logits, looked up by the exact token sequence (padding-side independent)."""

    def __init__(self, k: int, entries: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.k = k
        self.entries = entries or {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, ids: Sequence[int], topk_ids: torch.Tensor, topk_logits: torch.Tensor) -> None:
        self.entries[_key(ids)] = (topk_ids.to(torch.int32).cpu(), topk_logits.float().cpu())

    def lookup(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, k] ids and logits aligned with ``input_ids``; padded positions get zeros."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        out_ids = torch.zeros(B, T, self.k, dtype=torch.long)
        out_logits = torch.zeros(B, T, self.k)
        for row in range(B):
            real = mask[row].cpu()
            entry = self.entries.get(_key(input_ids[row].cpu()[real]))
            if entry is None:
                raise ValueError(
                    "no precomputed teacher logits for a training sequence: precompute_teacher_topk must see exactly "
                    "the tokenized rows the trainer feeds (no packing, same truncation)"
                )
            out_ids[row, real] = entry[0].long()
            out_logits[row, real] = entry[1]
        return out_ids, out_logits

    def save(self, path: str) -> None:
        """Write as a ``datasets`` Arrow dataset (columns key, ids, logits)."""
        from datasets import Dataset

        keys = list(self.entries)
        Dataset.from_dict(
            {
                "key": keys,
                "ids": [self.entries[k][0].tolist() for k in keys],
                "logits": [self.entries[k][1].tolist() for k in keys],
            }
        ).save_to_disk(path)

    @classmethod
    def load(cls, path: str) -> TeacherTopK:
        from datasets import load_from_disk

        ds = load_from_disk(path)
        entries = {
            k: (torch.tensor(i, dtype=torch.int32), torch.tensor(lg, dtype=torch.float32))
            for k, i, lg in zip(ds["key"], ds["ids"], ds["logits"])
        }
        k = next(iter(entries.values()))[0].shape[-1] if entries else 0
        return cls(k, entries)


@torch.no_grad()
def precompute_teacher_topk(teacher: nn.Module, data, k: int = 32, batch_size: int = 8, column: str = "input_ids"):
    """Run the teacher once over tokenized rows (a Dataset with ``input_ids`` or lists of ids) → :class:`TeacherTopK`."""
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if hasattr(data, "column_names"):
        if column not in data.column_names:
            raise ValueError(f"dataset has no {column!r} column (columns: {data.column_names}); tokenize it first")
        data = data[column]
    rows = [list(r) for r in data]
    if not rows:
        raise ValueError("no rows to precompute teacher logits for")
    device = next(teacher.parameters()).device
    store = TeacherTopK(k)
    was_training = teacher.training
    teacher.eval()
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            if k > logits.shape[-1]:
                raise ValueError(f"k={k} exceeds the vocabulary size {logits.shape[-1]}")
            vals, idx = logits.float().topk(k, dim=-1)
            for j, r in enumerate(chunk):
                store.add(r, idx[j, : len(r)], vals[j, : len(r)])
    finally:
        teacher.train(was_training)
    return store


class LogitDistillation:
    """``compute_loss_func`` mixing next-token CE with KL to a teacher: ``(1−w)·CE + w·τ²·KL(p_T^τ ‖ p_S^τ)``.

    Args:
        student: the model being trained (plain or PEFT); a pre-hook on its decoder records the inputs.
        teacher: the unpruned model, run under ``no_grad`` on the same inputs (its device; logits moved back).
        topk: a :class:`TeacherTopK` from :func:`precompute_teacher_topk` instead of a live teacher.
        temperature: τ > 0. weight: w in [0, 1] (0 = plain SFT, 1 = pure distillation).

    Example::

        kd = LogitDistillation(student, teacher, temperature=2.0, weight=0.5)
        Trainer(model=student, args=args, train_dataset=ds, compute_loss_func=kd).train()
        kd.remove()      # drop the hook when done
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        topk: TeacherTopK | None = None,
        temperature: float = 2.0,
        weight: float = 0.5,
    ):
        if (teacher is None) == (topk is None):
            raise ValueError("give exactly one of teacher= (a model) or topk= (precompute_teacher_topk output)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        refuse_zero3(student, "LogitDistillation (student)")
        refuse_sharded_bnb(student, "LogitDistillation (student)")
        if teacher is not None:
            refuse_zero3(teacher, "LogitDistillation (teacher)")
            refuse_sharded_bnb(teacher, "LogitDistillation (teacher)")
        blocks_name, _ = find_decoder_blocks(student)
        decoder = student.get_submodule(blocks_name.rpartition(".")[0])
        self.teacher, self.topk = teacher, topk
        self.temperature, self.weight = float(temperature), float(weight)
        self._inputs: dict[str, torch.Tensor] = {}
        self._handle = decoder.register_forward_pre_hook(self._record, with_kwargs=True)
        self.last: dict[str, float] = {}
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def _record(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs = {"input_ids": ids}
        for key in ("attention_mask", "position_ids"):
            if isinstance(kwargs.get(key), torch.Tensor):
                self._inputs[key] = kwargs[key]

    def remove(self) -> None:
        """Remove the input-recording hook from the student."""
        self._handle.remove()

    def teacher_targets(self, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = self._inputs.get("input_ids")
        if ids is None:
            raise ValueError("LogitDistillation saw no input_ids in the student's forward (inputs_embeds unsupported)")
        if ids.shape != student_logits.shape[:2]:
            raise ValueError("recorded inputs do not match the logits being scored (was the student run in between?)")
        if self.topk is not None:
            t_ids, t_logits = self.topk.lookup(ids, self._inputs.get("attention_mask"))
            return {"topk_ids": t_ids, "topk_logits": t_logits}
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            out = self.teacher(**{k: v.to(device) for k, v in self._inputs.items()}, use_cache=False)
        return {"teacher_logits": out.logits}

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if labels is None:
            raise ValueError("LogitDistillation needs labels (the Trainer passes them to compute_loss_func)")
        ce = causal_ce(logits, labels, num_items_in_batch)
        if self.weight == 0.0:
            self.last = {"ce": float(ce.detach())}
            return ce
        kd = kd_loss(
            logits,
            labels=labels,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
            **self.teacher_targets(logits),
        )
        self.last = {"ce": float(ce.detach()), "kd": float(kd.detach())}
        return (1.0 - self.weight) * ce + self.weight * kd
