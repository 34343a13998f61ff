"""Self-data distillation: the unpruned teacher rewrites every training response in its own words.

Thangarasa et al., "Self-Data Distillation for Recovering Quality in Pruned Large Language Models" (MLSys 2025,
arXiv 2410.09982), reusing SDFT (Yang et al., "Self-Distillation Bridges Distribution Gap in Language Model
Fine-Tuning", ACL 2024): the teacher sees the instruction *and the original answer as a reference* and writes its
own response; fine-tuning the pruned student on these rewrites stays closer to the teacher's distribution than
fine-tuning on the original answers, so less is forgotten.

A rewrite is kept only if it passes the filter (SDFT ``gen_distilled_data.py``): it contains none of the phrases
that betray copying the prompt ("reference answer", "your response", …, or starts with "Your turn") and, for
checkable tasks (``template="math"``), its final answer equals the gold one. Otherwise the original response is
kept. Generation is batched (length buckets, left padding), seeded per batch, and streamed to an Arrow cache that
an interrupted run resumes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json
from ..sft_data import extract_final_answer
from .generation import (
    BACKENDS,
    batch_seed,
    common_prefix,
    length_buckets,
    make_backend,
    require_vllm,
    vllm_sampling_kwargs,
)

__all__ = [
    "BAD_PHRASES",
    "TEMPLATES",
    "DistillTemplate",
    "answer_matches",
    "build_prompt",
    "distill_stats",
    "no_bad_phrases",
    "non_empty",
    "self_distill",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META_COLUMNS = ("distill_original", "distill_rewrite", "distill_accepted", "distill_reason")


# ---------------------------------------------------------------------------------------------------------------
# templates (SDFT, sail-sg/sdft main.py)


@dataclass(frozen=True)
class DistillTemplate:
    """How the teacher is asked to rewrite a response.

    ``user`` (chat) and ``plain`` (no chat template) are ``str.format`` strings with the fields ``{instruction}``
    and ``{reference}`` (the original response); ``plain`` may also use ``{system}``. ``response_prefix`` is
    pre-filled into the assistant turn (SDFT's math template starts with "Great! Let's think step by step. ");
    the stored rewrite is the generated continuation after it.
    """

    name: str
    system: str | None
    user: str
    plain: str
    response_prefix: str = ""

    def validate(self) -> None:
        for field_name in ("user", "plain"):
            fields = {f for _, f, _, _ in string.Formatter().parse(getattr(self, field_name)) if f is not None}
            allowed = {"instruction", "reference"} | ({"system"} if field_name == "plain" else set())
            if fields - allowed or not {"instruction", "reference"} <= fields:
                raise ValueError(
                    f"template {self.name!r}: {field_name} must use the fields {{instruction}} and {{reference}}"
                    f"{' (and optionally {system})' if field_name == 'plain' else ''}, got {sorted(fields)}"
                )


_GENERAL_USER = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
TEMPLATES: dict[str, DistillTemplate] = {
    # SDFT `alpaca_distill_using`
    "general": DistillTemplate(
        "general",
        system="Below are an instruction that describes a task along with a reference answer. "
        "Using the reference answer as a guide, write your own response.",
        user=_GENERAL_USER,
        plain="{system}\n\n" + _GENERAL_USER,
    ),
    # SDFT `alpaca_distill_refer`
    "general_refer": DistillTemplate(
        "general_refer",
        system="Below are an instruction that describes a task along with a reference answer. "
        "Refer to the reference answer and write your own response.",
        user=_GENERAL_USER,
        plain="{system}\n\n" + _GENERAL_USER,
    ),
    # SDFT `gsm8k_distill`
    "math": DistillTemplate(
        "math",
        system="You are an expert in math. Below are a math question and its reference answer. Refer to the "
        "reference answer and write a response that appropriately answers the question.",
        user="{instruction}\n\n{reference}",
        plain="{system}\n\n### Question:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n",
        response_prefix="Great! Let's think step by step. ",
    ),
}


def _resolve_template(template: str | DistillTemplate) -> DistillTemplate:
    if isinstance(template, DistillTemplate):
        template.validate()
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)} or a DistillTemplate, got {template!r}")
    return TEMPLATES[template]


def _chat_messages(tpl: DistillTemplate, instruction: str, reference: str) -> list[dict]:
    msgs = [{"role": "system", "content": tpl.system}] if tpl.system else []
    return [*msgs, {"role": "user", "content": tpl.user.format(instruction=instruction, reference=reference)}]


def build_prompt(tokenizer, template: str | DistillTemplate, instruction: str, reference: str, chat: bool) -> str:
    """The rewrite prompt as text: the tokenizer's chat template (``chat=True``) or the plain format."""
    tpl = _resolve_template(template)
    if chat:
        text = tokenizer.apply_chat_template(
            _chat_messages(tpl, instruction, reference), tokenize=False, add_generation_prompt=True
        )
    else:
        text = tpl.plain.format(system=tpl.system or "", instruction=instruction, reference=reference)
        if not tpl.system:
            text = text.lstrip("\n")
    return text + tpl.response_prefix


def _check_chat_fit(tokenizer, tpl: DistillTemplate) -> None:
    """Render sentinel messages: the chat template must accept the roles and keep both texts."""
    sys_mark, user_mark = "\x1fSYSTEM-SENTINEL\x1f", "\x1fUSER-SENTINEL\x1f"
    probe = DistillTemplate(tpl.name, sys_mark if tpl.system else None, user_mark + "{instruction}{reference}", "")
    try:
        text = tokenizer.apply_chat_template(_chat_messages(probe, "", ""), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises TemplateError / TypeError for unsupported roles
        raise ValueError(
            f"template {tpl.name!r} does not fit the tokenizer's chat template ({exc}); "
            "pass chat_template=False for the plain-text prompt, or a DistillTemplate with system=None"
        ) from exc
    if not isinstance(text, str) or user_mark not in text or (tpl.system and sys_mark not in text):
        lost = "system message" if tpl.system and user_mark in str(text) else "user message"
        raise ValueError(
            f"template {tpl.name!r} does not fit the tokenizer's chat template: it drops the {lost}; "
            "pass chat_template=False for the plain-text prompt, or a DistillTemplate with system=None"
        )


# ---------------------------------------------------------------------------------------------------------------
# filter (SDFT eval/gen_distilled_data.py)

BAD_PHRASES = ("reference answer", "your response", "my response", "your own response", "now it's your turn")

Check = Callable[[dict, str], "bool | str | None"]


def no_bad_phrases(example: dict, rewrite: str) -> str | None:
    """Reject rewrites that talk about the prompt instead of answering (SDFT's phrase list)."""
    low = rewrite.lower()
    for phrase in BAD_PHRASES:
        if phrase in low:
            return f"contains {phrase!r}"
    if low.lstrip().startswith("your turn"):
        return "starts with 'your turn'"
    return None


def non_empty(example: dict, rewrite: str) -> str | None:
    """Reject blank rewrites."""
    return None if rewrite.strip() else "empty"


def answer_matches(example: dict, rewrite: str) -> str | None:
    """Math rule: the rewrite's final answer (``#### n`` or the last integer) equals the gold answer."""
    gold = example.get("gold_answer")
    if gold is None:
        return "no gold answer"
    got = extract_final_answer(rewrite)
    return None if got == gold else f"answer {got} != gold {gold}"


FILTERS: dict[str, tuple[Check, ...]] = {
    "general": (non_empty, no_bad_phrases),
    "math": (non_empty, no_bad_phrases, answer_matches),
    "none": (),
}


def _resolve_filter(filter_, tpl: DistillTemplate) -> tuple[Check, ...]:
    if filter_ is None:
        filter_ = "math" if tpl.name == "math" else "general"
    if isinstance(filter_, str):
        if filter_ not in FILTERS:
            raise ValueError(
                f"filter must be one of {sorted(FILTERS)}, a callable or a list of callables, got {filter_!r}"
            )
        return FILTERS[filter_]
    checks = (filter_,) if callable(filter_) else tuple(filter_)
    if not all(callable(c) for c in checks):
        raise ValueError("filter must be a name, a callable check(example, rewrite) or a list of such callables")
    return checks


def _apply_checks(checks: Sequence[Check], example: dict, rewrite: str) -> str | None:
    """None when every check passes, else the first rejection reason."""
    for check in checks:
        verdict = check(example, rewrite)
        if verdict is None or verdict is True:
            continue
        return verdict if isinstance(verdict, str) else getattr(check, "__name__", "check failed")
    return None


# ---------------------------------------------------------------------------------------------------------------
# dataset fields

_FIELD_PAIRS = (("prompt", "completion"), ("instruction", "output"), ("question", "answer"))


def _content(value, role: str) -> str:
    """A string, or the last ``role`` message's content of a conversational (list of messages) field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        texts = [m.get("content", "") for m in value if m.get("role") == role]
        if texts and isinstance(texts[-1], str):
            return texts[-1]
    raise ValueError(
        f"expected a string or a list of {{'role','content'}} messages with a {role!r} turn, got {value!r:.80}"
    )


def _resolve_columns(columns: list[str], prompt_column, response_column, answer_column):
    if prompt_column is None and response_column is None:
        for p, r in _FIELD_PAIRS:
            if p in columns and r in columns:
                prompt_column, response_column = p, r
                break
        else:
            raise ValueError(
                f"dataset needs an instruction and a response field: one of the column pairs "
                f"{[list(p) for p in _FIELD_PAIRS]} or prompt_column=/response_column=; it has {columns}"
            )
    elif prompt_column is None:  # only the response named: take the first usual instruction column
        prompt_column = next((p for p, _ in _FIELD_PAIRS if p in columns), None)
    elif response_column is None:
        response_column = next((r for _, r in _FIELD_PAIRS if r in columns and r != prompt_column), None)
    for arg, col in (("prompt_column", prompt_column), ("response_column", response_column)):
        if col is None or col not in columns:
            raise ValueError(f"{arg}={col!r} is not a column of the dataset (columns: {columns})")
    if answer_column is None and "answer" in columns and response_column != "answer":
        answer_column = "answer"
    if answer_column is not None and answer_column not in columns:
        raise ValueError(f"answer_column={answer_column!r} is not a column of the dataset (columns: {columns})")
    return prompt_column, response_column, answer_column


def _gold(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return extract_final_answer(value)
    return None


# ---------------------------------------------------------------------------------------------------------------
# generation arguments


def _check_generation_kwargs(generation_kwargs: dict, backend: str, teacher) -> None:
    """Refuse generation arguments ``generate`` would reject, before the cache or any generation.

    Values go through ``GenerationConfig.update`` (transformers' own checks, e.g. ``max_new_tokens`` > 0); names
    must be a ``GenerationConfig`` field, an argument of ``generate`` or of the teacher's ``forward`` (checked only
    for transformers models: a custom ``generate`` may take anything). vLLM: names it can map.
    """
    if backend == "vllm":
        vllm_sampling_kwargs(generation_kwargs, 0)
        return
    import inspect

    from transformers import GenerationConfig, GenerationMixin

    for key in ("max_new_tokens", "min_new_tokens", "max_length", "num_return_sequences", "top_k"):
        value = generation_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer (generation argument), got {value!r}")
    try:
        unused = GenerationConfig().update(**generation_kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid generation arguments {generation_kwargs}: {exc}") from None
    if not unused or not isinstance(teacher, GenerationMixin):
        return
    base = teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher
    known = set(inspect.signature(GenerationMixin.generate).parameters) | set(
        inspect.signature(base.forward).parameters
    )
    unknown = sorted(k for k in unused if k not in known)
    if unknown:
        raise ValueError(
            f"generation arguments {unknown} are not GenerationConfig fields nor arguments of generate() or of "
            f"{type(base).__name__}.forward; allowed: GenerationConfig fields such as max_new_tokens, do_sample, "
            "temperature, top_p, top_k, repetition_penalty"
        )


# ---------------------------------------------------------------------------------------------------------------
# cache


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def _teacher_digest(teacher) -> dict:
    """Identity of the teacher: name, config and a cheap digest of every tensor (sums, not a full hash)."""
    if isinstance(teacher, (str, os.PathLike)):
        return {"name_or_path": str(teacher)}
    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():
        flat = t.detach().reshape(-1)
        head = flat[:8].double().cpu().tolist() if flat.is_floating_point() else flat[:8].cpu().tolist()
        stats = (flat.double().sum().item(), flat.double().abs().sum().item()) if flat.is_floating_point() else ()
        h.update(json.dumps([name, list(t.shape), str(t.dtype), head, stats]).encode())
    return {
        "name_or_path": getattr(teacher, "name_or_path", None),
        "class": type(teacher).__name__,
        "config": _sha(teacher.config.to_dict()),
        "weights": h.hexdigest(),
        "generation_config": _sha(getattr(teacher, "generation_config", None) and teacher.generation_config.to_dict()),
    }


class _ShardCache:
    """One Arrow shard (``datasets.save_to_disk``) per generated batch, renamed into place when complete."""

    def __init__(self, root: str | os.PathLike, config: dict, overwrite: bool):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.config_path = self.root / "config.json"
        self.config = config
        if self.root.exists() and any(self.root.iterdir()):
            if not self.config_path.exists():
                raise ValueError(
                    f"cache_dir {str(self.root)!r} is not empty and holds no self_distill cache (config.json); "
                    "pass an empty or new directory"
                )
            stored = json.loads(self.config_path.read_text())
            has_rows = self.shards.is_dir() and any(s.name.startswith("batch-") for s in self.shards.iterdir())
            if stored.get("fingerprint") != config["fingerprint"]:
                # a cache without a stored batch (a run that failed before its first one) has nothing to lose
                if not overwrite and has_rows:
                    old, new = stored.get("config", {}), config["config"]
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise ValueError(
                        f"cache_dir {str(self.root)!r} holds a different configuration (differs in: {diff}); "
                        "pass overwrite=True to discard it, or use another cache_dir"
                    )
                shutil.rmtree(self.shards, ignore_errors=True)
                for f in ("config.json", "stats.json"):
                    (self.root / f).unlink(missing_ok=True)
        self.shards.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # leftovers of a shard write of an older version
            shutil.rmtree(stale, ignore_errors=True)
        if not self.config_path.exists():
            atomic_write_json(self.config_path, config, sort_keys=True)

    def load(self) -> dict[int, str]:
        from datasets import load_from_disk

        done: dict[int, str] = {}
        for shard in sorted(self.shards.iterdir()):
            if shard.is_dir() and shard.name.startswith("batch-"):
                ds = load_from_disk(str(shard))
                done.update(zip(ds["index"], ds["rewrite"]))
        return done

    def write(self, batch_index: int, indices: list[int], rewrites: list[str]) -> None:
        from datasets import Dataset
        from datasets import utils as ds_utils

        bars_were_on = not ds_utils.are_progress_bars_disabled()
        ds_utils.disable_progress_bars()  # one "Saving the dataset" bar per batch would drown the real progress bar
        try:
            # built aside and renamed in: load() only ever sees complete "batch-*" shards
            with atomic_dir(self.shards / f"batch-{batch_index:06d}", overwrite=True) as tmp:
                Dataset.from_dict({"index": indices, "rewrite": rewrites}).save_to_disk(str(tmp))
        finally:
            if bars_were_on:
                ds_utils.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------
# main entry point


def self_distill(
    teacher,
    tokenizer=None,
    dataset=None,
    template: str | DistillTemplate = "general",
    cache_dir: str | os.PathLike | None = None,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    answer_column: str | None = None,
    filter: str | Check | Sequence[Check] | None = None,
    chat_template: bool | None = None,
    batch_size: int = 16,
    seed: int = 0,
    backend: str = "transformers",
    engine_kwargs: dict | None = None,
    prefix_cache: bool = True,
    overwrite: bool = False,
    keep_metadata: bool = True,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    **generation_kwargs,
):
    """Rewrite every response of ``dataset`` with the (unpruned) ``teacher``; return the distilled ``Dataset``.

    Args:
        teacher: a causal LM (or, with ``backend="vllm"``, a Hub id / checkpoint path).
        dataset: ``datasets.Dataset`` (or list of dicts) with an instruction and a response field — auto-detected
            from ``prompt``/``completion``, ``instruction``/``output`` (+ ``input``), ``question``/``answer``, or
            named with ``prompt_column`` / ``response_column``. Conversational (message-list) fields work too.
        template: ``"general"`` | ``"general_refer"`` | ``"math"`` (SDFT prompts) or a :class:`DistillTemplate`.
        cache_dir: stream results to this Arrow cache; a rerun resumes without regenerating. A cache made with
            another teacher, template, dataset or generation setting raises ``ValueError`` unless ``overwrite``.
        answer_column: gold answers for the math filter (default ``"answer"`` when it exists and is not the
            response); without it the gold is extracted from the original response.
        filter: ``"math"`` (default for the math template: SDFT phrase rule + final answer equals gold),
            ``"general"`` (phrase rule + non-empty), ``"none"``, or callables ``check(example, rewrite)``
            returning ``None``/``True`` (pass), ``False`` or a reason string (reject). ``example`` holds the
            row's columns plus ``instruction``, ``reference`` and ``gold_answer``. Rejected rows keep the original.
        chat_template: use the tokenizer's chat template (default: when it has one) or the plain-text prompt.
        batch_size: prompts per batch (sorted by length, left-padded); 1 = per-sample loop. A batch is decoded a few
            tokens per ``generate`` call with finished rows dropped between calls (``generation.DECODE_CHUNK``).
        seed: torch is seeded per batch, so sampled rewrites are reproducible and resume-stable.
        prefix_cache: (transformers backend) prefill the prompts' shared template prefix once and reuse its KV
            cache in every batch; the same tokens as without it, less prefill work.
        keep_metadata: add ``distill_original``, ``distill_rewrite``, ``distill_accepted``, ``distill_reason``.
        on_batch: ``on_batch(batch_index, rows_done)`` after each batch is stored.
        **generation_kwargs: passed to ``generate`` (``max_new_tokens`` default 256, greedy unless
            ``do_sample=True``; ``temperature``, ``top_p`` …).

    Example::

        distilled = self_distill(teacher=model, tokenizer=tok, dataset=ds, template="math", cache_dir="cache/sd")
        print(distill_stats(distilled))      # {'rows': …, 'accepted': …, 'acceptance_rate': …}
    """
    from datasets import Dataset

    # ---- validate everything before any generation ----
    tpl = _resolve_template(template)
    checks = _resolve_filter(filter, tpl)
    if dataset is None:
        raise ValueError("dataset is required (a datasets.Dataset or a list of dicts)")
    if isinstance(dataset, list):
        dataset = Dataset.from_list(dataset)
    if not hasattr(dataset, "column_names"):
        raise ValueError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
    if backend == "vllm":
        require_vllm()
    teacher_name = str(teacher) if isinstance(teacher, (str, os.PathLike)) else None
    if tokenizer is None:
        if teacher_name is None:
            raise ValueError("tokenizer is required when teacher is a model object")
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(teacher_name)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        chat_template = has_chat
    elif chat_template and not has_chat:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    if chat_template:
        _check_chat_fit(tokenizer, tpl)
    columns = list(dataset.column_names)
    p_col, r_col, a_col = _resolve_columns(columns, prompt_column, response_column, answer_column)
    generation_kwargs.setdefault("max_new_tokens", 256)
    generation_kwargs.setdefault("do_sample", False)
    _check_generation_kwargs(generation_kwargs, backend, teacher)  # before the cache: a typo must not pin it
    if teacher_name is not None and backend == "transformers":  # load only once the inputs are known good
        from ..models import load_model

        teacher = load_model(teacher_name)
        _check_generation_kwargs(generation_kwargs, backend, teacher)  # names against the loaded model's forward

    # ---- examples and prompts ----
    rows = dataset.to_list()
    examples: list[dict] = []
    for i, row in enumerate(rows):
        instruction = _content(row[p_col], "user")
        if p_col == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
            instruction = f"{instruction}\n\n{row['input']}"
        reference = _content(row[r_col], "assistant")
        gold = _gold(row[a_col]) if a_col is not None else extract_final_answer(reference)
        examples.append({**row, "instruction": instruction, "reference": reference, "gold_answer": gold, "_i": i})
    if answer_matches in checks and all(e["gold_answer"] is None for e in examples):
        raise ValueError(
            "the math filter needs gold answers: give an answer column (answer_column=) with integers, or responses "
            "that end with '#### <integer>'; or pass filter='general'"
        )
    texts = [build_prompt(tokenizer, tpl, e["instruction"], e["reference"], chat_template) for e in examples]
    # chat-rendered text already carries its special tokens; the plain format gets the tokenizer's BOS
    prompt_ids = [tokenizer(t, add_special_tokens=not chat_template)["input_ids"] for t in texts]
    batches = length_buckets([len(p) for p in prompt_ids], batch_size)

    config = {
        "teacher": _teacher_digest(teacher),
        "template": asdict(tpl),
        "chat_template": chat_template,
        "generation_kwargs": generation_kwargs,
        "seed": seed,
        "batch_size": batch_size,
        "backend": backend,
        "prompts": _sha(prompt_ids),  # covers the dataset, the template rendering and the tokenizer
        "rows": len(prompt_ids),
    }
    fingerprint = _sha(config)
    cache = (
        _ShardCache(cache_dir, {"version": CACHE_VERSION, "fingerprint": fingerprint, "config": config}, overwrite)
        if cache_dir
        else None
    )
    done = cache.load() if cache else {}
    if done and (max(done) >= len(rows) or min(done) < 0):
        raise ValueError(f"cache_dir {str(cache_dir)!r} holds rows outside this dataset; pass overwrite=True")

    # ---- generate what is missing ----
    todo = [(b, batch) for b, batch in enumerate(batches) if any(i not in done for i in batch)]
    if todo:
        # the template's shared prefix, over all prompts (not the batch): a resumed run reuses the same prefix
        prefix = common_prefix(prompt_ids) if prefix_cache and backend == "transformers" else None
        gen = make_backend(backend, teacher, tokenizer, generation_kwargs, engine_kwargs, prefix_ids=prefix)
        from tqdm.auto import tqdm

        for b, batch in tqdm(todo, desc="self-distill", unit="batch", disable=not progress):
            batch = [i for i in batch if i not in done]
            outputs = gen.generate([prompt_ids[i] for i in batch], batch_seed(seed, b))
            outputs = [o.strip() for o in outputs]
            if cache is not None:
                cache.write(b, batch, outputs)
            done.update(zip(batch, outputs))
            if on_batch is not None:
                on_batch(b, len(done))

    # ---- filter and assemble ----
    rewrites = [done[i] for i in range(len(rows))]
    reasons = [
        _apply_checks(checks, {k: v for k, v in e.items() if k != "_i"}, rw) for e, rw in zip(examples, rewrites)
    ]
    out_rows = []
    for e, row, rewrite, reason in zip(examples, rows, rewrites, reasons):
        chosen = rewrite if reason is None else e["reference"]
        new = dict(row)
        if isinstance(row[r_col], str):
            new[r_col] = chosen
        else:  # conversational: same message structure, new assistant content
            new[r_col] = [{"role": "assistant", "content": chosen}]
        if keep_metadata:
            new.update(
                distill_original=e["reference"],
                distill_rewrite=rewrite,
                distill_accepted=reason is None,
                distill_reason=reason or "",
            )
        out_rows.append(new)
    result = Dataset.from_list(out_rows)
    stats = _stats(rewrites, reasons)
    logger.info("self_distill: %s", stats)
    if cache is not None:
        atomic_write_json(cache.root / "stats.json", stats, sort_keys=True)
    return result


def _stats(rewrites: list[str], reasons: list[str | None]) -> dict:
    n = len(reasons)
    accepted = sum(r is None for r in reasons)
    # group reasons by their kind ("answer 3 != gold 5" → "answer mismatch") so the counts are readable
    kinds = Counter("answer mismatch" if r.startswith("answer ") else r for r in reasons if r is not None)
    return {
        "rows": n,
        "accepted": accepted,
        "rejected": n - accepted,
        "acceptance_rate": accepted / n if n else 0.0,
        "reject_reasons": dict(kinds.most_common()),
        "mean_rewrite_chars": sum(len(r) for r in rewrites) / n if n else 0.0,
    }


def distill_stats(distilled) -> dict:
    """Acceptance statistics of a dataset returned by :func:`self_distill` (needs ``keep_metadata=True``)."""
    missing = [c for c in META_COLUMNS if c not in distilled.column_names]
    if missing:
        raise ValueError(f"dataset lacks the self_distill metadata columns {missing}; run with keep_metadata=True")
    reasons = [None if a else r for a, r in zip(distilled["distill_accepted"], distilled["distill_reason"])]
    return _stats(list(distilled["distill_rewrite"]), reasons)
