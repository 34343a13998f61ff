"""Perplexity and sparsity reports."""

from __future__ import annotations

import math

import torch
from torch import nn

from .data import texts_from
from .sparsity import nm_violations, parse_pattern

__all__ = [
    "LM_EVAL_MISSING",
    "lm_eval",
    "perplexity",
    "resolve_tasks",
    "sparsity_by_type",
    "sparsity_report",
    "tokenize_stream",
]


def tokenize_stream(texts, tokenizer, max_tokens: int | None = None, text_column: str = "text") -> torch.Tensor:
    """Join texts with blank lines and tokenize them into one 1-D LongTensor (first ``max_tokens`` tokens)."""
    texts = texts_from(texts, text_column)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    texts=None,
    *,
    tokens: torch.Tensor | None = None,
    seqlen: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity with strided windows over one token stream.

    Each window has ``seqlen`` tokens; consecutive windows start ``stride`` apart (default ``seqlen``: disjoint
    windows, as in the Wanda/SparseGPT WikiText evaluation). With overlap, only the tokens not scored by the
    previous window count, so every token is scored once with up to ``seqlen − stride`` tokens of context.
    """
    # every check before the first forward pass; seqlen first, so seqlen=0 is reported as seqlen
    if not _is_int(seqlen) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (a window scores tokens 2..seqlen), got {seqlen!r}")
    if stride is not None and (not _is_int(stride) or not 1 <= stride <= seqlen):
        raise ValueError(f"stride must be an integer in [1, seqlen={seqlen}] or None (= seqlen), got {stride!r}")
    stride = stride or seqlen
    for name, value in (("max_windows", max_windows), ("batch_size", batch_size)):
        if (value is not None or name == "batch_size") and (not _is_int(value) or value < 1):
            raise ValueError(
                f"{name} must be a positive integer{' or None' if name == 'max_windows' else ''}, got {value!r}"
            )
    if tokens is None:
        if texts is None or tokenizer is None:
            raise ValueError("perplexity needs either tokens= or texts= with a tokenizer")
        max_tokens = None if max_windows is None else max_windows * stride + seqlen + 1
        try:
            tokens = tokenize_stream(texts, tokenizer, max_tokens)
        except ValueError as exc:  # texts_from names the data, not this argument
            raise ValueError(f"texts: {exc}") from None
        if tokens.numel() < 2:
            raise ValueError(
                f"texts give {tokens.numel()} token(s); perplexity needs at least 2: pass non-empty texts"
            )
    _check_token_ids(model, tokens)
    tokens = tokens.reshape(-1)
    if tokens.numel() < 2:
        raise ValueError(f"tokens has {tokens.numel()} element(s); perplexity needs at least 2 token ids")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows: list[tuple[int, int, int]] = []  # (begin, end, number of scored tokens)
    prev_end = 0
    for begin in range(0, tokens.numel() - 1, stride):
        end = min(begin + seqlen, tokens.numel())
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == tokens.numel() or (max_windows is not None and len(windows) >= max_windows):
            break
    nll, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            # equal-length windows batch together; the (shorter) tail window runs alone
            groups: dict[int, list] = {}
            for w in chunk:
                groups.setdefault(w[1] - w[0], []).append(w)
            for length, ws in groups.items():
                ids = torch.stack([tokens[b:e] for b, e, _ in ws]).to(device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tgt = ids[:, 1:]
                tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, length-1], token t+1 given ≤ t
                for row, (_b, _e, n_new) in enumerate(ws):
                    n_new = min(n_new, length - 1)
                    nll += tok_nll[row, -n_new:].sum().item()
                    count += n_new
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token_ids(model: nn.Module, tokens) -> None:
    """Token ids must be an integer tensor inside the model's vocabulary (else: IndexError deep in the embedding)."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}; pass e.g. tokens.long()")
    if tokens.numel() == 0:
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab is not None and high >= vocab):
        allowed = f"[0, {vocab})" if vocab is not None else "non-negative"
        raise ValueError(
            f"tokens hold ids in [{low}, {high}] but the model's vocabulary allows {allowed}; "
            "tokenize with the model's own tokenizer"
        )


def _block_prefix(model: nn.Module) -> str | None:
    from ._hf import find_decoder_blocks

    try:
        return find_decoder_blocks(model)[0] + "."
    except ValueError:
        return None


def sparsity_report(
    model: nn.Module, patterns: tuple[str, ...] = ("2:4",), modules: list[str] | None = None, linear_only: bool = True
) -> dict:
    """Exact zeros per module and N:M validity for each pattern — one sparsity definition for every verb.

    ``sparsity`` (and ``zeros``, ``numel``, ``<pattern>_valid_modules``) covers the *pruned modules*: ``modules``
    when given, else the linear layers inside the decoder blocks (what every pruning method here targets).
    ``by_type`` splits them per module type (``q_proj``, ``down_proj`` …). Everything else with a 2-D weight
    (``lm_head``, embeddings) is listed under ``other`` — counted apart, never mixed into ``sparsity``; a
    ``lm_head`` tied to the embeddings is marked ``tied`` there and its parameters are not counted twice.
    """
    parsed = [parse_pattern(p) for p in patterns]
    prefix = _block_prefix(model) if modules is None else None
    per_module: dict[str, dict] = {}
    other: dict[str, dict] = {}
    seen: dict[int, str] = {}
    zeros = numel = 0
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or ".lora_" in name:
            continue  # adapter factors are not model weights
        pruned = name in modules if modules is not None else (prefix is None or name.startswith(prefix))
        if pruned and linear_only and not isinstance(mod, nn.Linear):
            pruned = False
        w = weight.detach()
        if not pruned:
            if name and (not modules or name not in modules):
                tied = seen.get(id(weight))
                z = int((w == 0).sum().item())
                other[name] = {"numel": 0 if tied else w.numel(), "zeros": 0 if tied else z, "tied": tied}
            seen.setdefault(id(weight), name)
            continue
        seen.setdefault(id(weight), name)
        z = int((w == 0).sum().item())
        entry = {"numel": w.numel(), "zeros": z, "sparsity": z / w.numel()}
        for pat in parsed:
            if pat is not None:
                entry[f"{pat}_violations"] = nm_violations(w, pat.n, pat.m)
        per_module[name] = entry
        zeros += z
        numel += w.numel()
    out = {
        "sparsity": zeros / max(numel, 1),
        "zeros": zeros,
        "numel": numel,
        "modules": per_module,
        "by_type": sparsity_by_type(per_module),
        "other": other,
    }
    for pat in parsed:
        if pat is not None:
            out[f"{pat}_valid_modules"] = sum(1 for e in per_module.values() if e[f"{pat}_violations"] == 0)
    return out


def sparsity_by_type(per_module: dict[str, dict]) -> dict[str, dict]:
    """``sparsity_report``'s ``by_type``: per-module ``{"zeros", "numel"}`` entries summed per module type (the last
    name component: ``q_proj``, ``down_proj`` …) into ``{"modules", "zeros", "numel", "sparsity"}``, in first-seen
    order. Shared with the sharded export (``tuners._fsdp``), which counts modules while writing them."""
    by_type: dict[str, dict] = {}
    for name, entry in per_module.items():
        t = by_type.setdefault(name.rpartition(".")[2], {"modules": 0, "zeros": 0, "numel": 0})
        t["modules"] += 1
        t["zeros"] += entry["zeros"]
        t["numel"] += entry["numel"]
    for t in by_type.values():
        t["sparsity"] = t["zeros"] / max(t["numel"], 1)
    return by_type


# ------------------------------------------------------------------------------------------ lm-evaluation-harness

LM_EVAL_MISSING = "lm-evaluation-harness is not installed: pip install 'prune-peft[eval]' (or pip install lm-eval)"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None
    return lm_eval, HFLM


def resolve_tasks(tasks) -> tuple[list[str], list[str]]:
    """``tasks`` (``"a,b"``, a list, or paths of local task YAML files / folders) → (task names, include paths).

    A ``.yaml`` path is a local task: its folder is handed to lm-eval's ``TaskManager(include_path=...)`` and its
    ``task:`` name is evaluated, so local tasks run offline (their data can be local ``json``/``csv`` files).
    """
    import os

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names or task YAML paths, got {tasks!r}")
    names, include = [], []
    for t in tasks:
        if t.endswith((".yaml", ".yml")):
            if not os.path.isfile(t):
                raise ValueError(f"tasks: the task file {t!r} does not exist")
            import yaml

            with open(t, encoding="utf-8") as f:
                name = (yaml.safe_load(f) or {}).get("task")
            if not isinstance(name, str):
                raise ValueError(f"tasks: {t!r} has no `task:` name (an lm-eval task YAML needs one)")
            names.append(name)
            include.append(os.path.dirname(os.path.abspath(t)))
        elif os.path.isdir(t):
            include.append(os.path.abspath(t))
        else:
            names.append(t)
    if not names:
        raise ValueError(f"tasks: {tasks!r} names no task (a folder only adds task definitions; name the tasks too)")
    return names, sorted(set(include))


def lm_eval(
    model: nn.Module,
    tokenizer,
    tasks,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    output: str | None = None,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Run lm-evaluation-harness on the in-memory ``model`` (dense, pruned, with any prune_peft adapter attached,
    merged or compacted): ``lm_eval.simple_evaluate`` with ``lm_eval.models.huggingface.HFLM`` around the model, so
    nothing has to be registered or saved first.

    ``tasks``: names (``"hellaswag,arc_easy"``) and/or local task YAML files (evaluated offline with their local
    data). ``output``: a JSON file (or a folder, which gets ``lm_eval_results.json``) for the results. Returns
    ``{"results": {task: {metric: value}}, "versions": ..., "n-samples": ..., "config": {...}}`` (lm-eval's
    result dict without the per-sample logs). ``kwargs`` go to ``simple_evaluate``.
    """
    names, include = resolve_tasks(tasks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_fewshot is not None and (
        isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0
    ):
        raise ValueError(f"num_fewshot must be a non-negative integer or None, got {num_fewshot!r}")
    lm_eval_pkg, HFLM = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=include or None)
        raw = lm_eval_pkg.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            **kwargs,
        )
    finally:
        model.train(was_training)
    result = {k: raw[k] for k in ("results", "versions", "n-samples", "configs") if k in raw}
    result["config"] = {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size}
    if output is not None:
        import os

        from ._io import atomic_write_json

        path = os.path.join(output, "lm_eval_results.json") if os.path.isdir(output) else output
        atomic_write_json(path, result)
        result["path"] = path
    return result
