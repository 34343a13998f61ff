"""Offline supervised fine-tuning data the package can make with no download.

- :func:`arithmetic_problems`: generated word problems with a worked answer and a gold integer (GSM8K-like
  format: the completion ends with ``"#### <answer>"``), so answers can be checked exactly.
- :func:`shakespeare_continuations`: a passage of the Shakespeare text as prompt, its continuation as completion.

Both return ``datasets.Dataset`` in the standard prompt/completion form trl's ``SFTTrainer`` accepts; use
:func:`to_messages` for the conversational form.
"""

from __future__ import annotations

import random
import re

__all__ = ["arithmetic_problems", "extract_final_answer", "shakespeare_continuations", "to_messages"]

_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "cards", "eggs", "flowers"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        q = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        ans = a + b
        work = f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {ans}."
    elif kind == 1:
        a = a + b
        q = f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} does {name} have left?"
        ans = a - b
        work = f"{name} gives away {b} of {a} {item}, so {a} - {b} = {ans}."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?"
        ans = a * b
        work = f"There are {a} boxes with {b} {item} each, so {a} * {b} = {ans}."
    else:
        c = rng.randint(2, 20)
        q = f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have at the end?"
        ans = a + b - c
        work = f"{name} has {a} + {b} = {a + b} {item}, then {a + b} - {c} = {ans}."
    return q, f"{work}\n#### {ans}", ans


def arithmetic_problems(n: int = 1000, seed: int = 0):
    """``n`` generated word problems: columns ``prompt``, ``completion`` (ends with ``#### <answer>``), ``answer``."""
    from datasets import Dataset

    if n <= 0:
        raise ValueError(f"n must be a positive integer, got {n}")
    rng = random.Random(seed)
    rows = [_problem(rng) for _ in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [r[0] for r in rows],
            "completion": [r[1] for r in rows],
            "answer": [r[2] for r in rows],
        }
    )


_ANSWER_RE = re.compile(r"####\s*(-?\d[\d,]*)")
_INT_RE = re.compile(r"-?\d[\d,]*")


def extract_final_answer(text: str) -> int | None:
    """The integer after ``####`` if present, else the last integer in the text (SDFT's GSM8K rule)."""
    match = _ANSWER_RE.search(text)
    found = match.group(1) if match else (_INT_RE.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return int(found.replace(",", ""))
    except ValueError:
        return None


def shakespeare_continuations(
    split: str = "train", n: int | None = None, prompt_chars: int = 300, completion_chars: int = 200, seed: int = 0
):
    """Passages of the Shakespeare text cut into (prompt, completion) pairs; columns ``prompt``, ``completion``."""
    from datasets import Dataset

    from .data import shakespeare_texts

    if prompt_chars <= 0 or completion_chars <= 0:
        raise ValueError("prompt_chars and completion_chars must be positive")
    pairs = []
    for passage in shakespeare_texts(split, passage_chars=prompt_chars + completion_chars):
        if len(passage) < prompt_chars + completion_chars // 2:
            continue
        cut = passage.rfind("\n", 0, prompt_chars)
        cut = cut if cut > prompt_chars // 2 else prompt_chars
        pairs.append((passage[:cut], passage[cut : cut + completion_chars]))
    random.Random(seed).shuffle(pairs)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be a positive integer or None, got {n}")
        pairs = pairs[:n]
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


def to_messages(dataset, system: str | None = None):
    """prompt/completion → trl's conversational ``prompt``/``completion`` message lists."""

    def convert(row):
        prompt = [{"role": "user", "content": row["prompt"]}]
        if system:
            prompt.insert(0, {"role": "system", "content": system})
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": row["completion"]}]}

    return dataset.map(convert)
