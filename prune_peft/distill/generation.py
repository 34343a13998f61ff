"""Batched generation backends for self-distillation: the model's own ``generate`` (default) or vLLM.

The transformers path sorts prompts by length into buckets (little padding), left-pads them (a decoder continues
from the last position, so real tokens must end every row) and seeds torch per batch, so a batch's output does not
depend on which batches ran before it — what makes an interrupted run resume to the same result.

Shared-prefix caching: every rewrite prompt starts with the same template tokens (system prompt, chat markup), so
the longest common token prefix of all prompts is prefilled once into a transformers ``DynamicCache``; each batch
gets a deep copy expanded to its size (``Cache.batch_repeat_interleave``) and ``generate`` runs only the rest. A row
is then ``[prefix][pad…][suffix]``: the attention mask hides the pads and ``generate`` derives position ids from
the mask's cumulative sum, so every real token sees exactly the context and position it has in the per-sample loop.

Finished rows leave the batch: a per-sample loop stops each prompt at its end-of-sequence token, while one
``generate`` call keeps computing every row until the last one stops (on the benchmark's prompts about a quarter of
the batch's decode rows were already finished). So a batch is decoded in calls of :data:`DECODE_CHUNK` new tokens,
each continuing from the cache of the call before (``generate`` feeds only the tokens the cache lacks); between
calls the rows that produced an end-of-sequence token are dropped from the ids, the mask and the cache
(``Cache.batch_select_indices``). Greedy tokens are those of one call; only settings whose meaning survives the split
(see :data:`CHUNK_SAFE_KWARGS`) are chunked, anything else runs as one call.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "BACKENDS",
    "TransformersBackend",
    "VLLMBackend",
    "batch_seed",
    "common_prefix",
    "generate_texts",
    "length_buckets",
    "make_backend",
    "require_vllm",
    "vllm_sampling_kwargs",
]

BACKENDS = ("transformers", "vllm")

# New tokens per ``generate`` call of a chunked batch: smaller drops finished rows sooner, each call costs a setup.
DECODE_CHUNK = 4
# generation kwargs that mean the same whether a batch is generated in one call or continued chunk by chunk
# (min_new_tokens is carried over as what is still owed); stop strings, custom stopping criteria, beams or several
# sequences per prompt run as one call.
CHUNK_SAFE_KWARGS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
    }
)

logger = logging.getLogger(__name__)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed for one batch: distinct across (seed, batch) pairs, independent of run order."""
    return (seed * 1_000_003 + batch_index) % (2**63 - 1)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties by index: deterministic)."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def common_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Longest token prefix shared by all prompts, one token short of the shortest prompt (``generate`` needs at
    least one uncached token per row to produce the first logits). Empty for fewer than two prompts."""
    if len(prompts) < 2:
        return []
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return list(first[:n])


def _pad_token_id(tokenizer, model=None) -> int:
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(cand, int):
            return cand
    raise ValueError("tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")


def _supports_prefix_cache(model) -> bool:
    """A transformers generation model (or a peft wrapper of one): ``generate`` accepts ``past_key_values``."""
    from transformers import GenerationMixin

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, GenerationMixin)


def _eos_ids(model, generation_kwargs: dict) -> set[int] | None:
    """End-of-sequence ids when a batch may be generated in chunks with finished rows dropped between them (the only
    stop is an end-of-sequence token or ``max_new_tokens``); ``None`` when it must run as one ``generate`` call."""
    if not _supports_prefix_cache(model) or not set(generation_kwargs) <= CHUNK_SAFE_KWARGS:
        return None
    if not isinstance(generation_kwargs.get("max_new_tokens"), int):
        return None  # the length comes from the model's generation config: let generate read it in one call
    cfg = getattr(model, "generation_config", None)
    if cfg is None or (cfg.num_beams or 1) != 1 or (cfg.num_return_sequences or 1) != 1 or cfg.stop_strings:
        return None
    if cfg.min_length or getattr(cfg, "max_time", None):
        return None
    eos = generation_kwargs.get("eos_token_id", cfg.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return set(eos) or None  # no end-of-sequence token: no row ever stops early, nothing to drop


def _droppable(cache) -> bool:
    """Rows of this cache can be selected in place: every layer holds plain key/value tensors."""
    from transformers import DynamicCache, cache_utils

    plain = tuple(
        getattr(cache_utils, n) for n in ("DynamicLayer", "DynamicSlidingWindowLayer") if hasattr(cache_utils, n)
    )
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) in plain for layer in layers)


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class TransformersBackend:
    """Left-padded batched ``model.generate``; ``generation_kwargs`` pass straight through.

    ``prefix_ids``: token ids every prompt starts with (:func:`common_prefix`); they are prefilled once and their KV
    cache is reused by every batch. ``None`` or empty: no prefix caching (the plain batched ``generate``).
    ``timings`` accumulates wall seconds: ``prefix_prefill`` (the one shared prefill) and ``generate`` (the rest).
    Batches of several prompts are generated :data:`DECODE_CHUNK` tokens per call with finished rows dropped between
    calls when the generation settings allow it (module docstring).
    """

    name = "transformers"

    def __init__(
        self, model, tokenizer, generation_kwargs: dict | None = None, prefix_ids: Sequence[int] | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_kwargs = dict(generation_kwargs or {})
        for key in ("past_key_values", "cache"):
            if key in self.generation_kwargs:
                raise ValueError(f"generation_kwargs must not hold {key!r}: the backend manages the KV cache")
        self.pad_id = _pad_token_id(tokenizer, model)
        self.prefix = list(prefix_ids or [])
        if self.prefix and not _supports_prefix_cache(model):
            logger.info("prefix caching off: %s is not a transformers generation model", type(model).__name__)
            self.prefix = []
        self._prefix_cache = None  # DynamicCache of the prefix, batch 1 (filled on first use)
        self._eos = _eos_ids(model, self.generation_kwargs)  # None: every batch in one generate call
        self.calls = 0  # number of generate_ids() calls (tests count recomputation with it)
        self.timings = {"prefix_prefill": 0.0, "generate": 0.0}

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _prefill_prefix(self):
        t0 = time.perf_counter()
        ids = torch.tensor([self.prefix], dtype=torch.long, device=self._device())
        # only the cache is used: the logits of the last position are enough (the lm_head over 49k words per prefix
        # token would be wasted), when the model's forward takes logits_to_keep
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        keep = {"logits_to_keep": 1} if getattr(base, "_supports_logits_to_keep", lambda: False)() else {}
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **keep)
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
        self.timings["prefix_prefill"] += time.perf_counter() - t0
        # Layers that hold the whole prefix as plain key/value tensors can be copied and expanded per batch: full
        # attention, and sliding-window attention while the prefix fits the window; linear-attention, quantized and
        # other layers keep other state.
        if not _droppable(cache) or any(layer.keys.shape[-2] != len(self.prefix) for layer in cache.layers):
            logger.info("prefix caching off: the model's cache (%s) cannot be shared as is", type(cache).__name__)
            self.prefix = []
            return None
        return cache

    def generate(self, prompts: list[list[int]], seed: int) -> list[str]:
        """Decoded continuations of ``prompts`` (special tokens skipped)."""
        return self.tokenizer.batch_decode(self.generate_ids(prompts, seed), skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """New token ids per prompt, ``[B, T]`` as lists (rows that stopped early are padded with the pad id)."""
        if not prompts:
            return []
        p = len(self.prefix)
        bad = [i for i, q in enumerate(prompts) if p and (list(q[:p]) != self.prefix or len(q) <= p)]
        if bad:
            raise ValueError(
                f"prompts {bad[:5]} do not start with prefix_ids ({p} tokens) followed by at least one more token"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            if self.prefix and self._prefix_cache is None:
                self._prefix_cache = self._prefill_prefix()
            p = len(self.prefix)  # 0 when the model's cache cannot be shared
            tails = [q[p:] for q in prompts]
            width = max(len(t) for t in tails)
            ids = torch.full((len(prompts), p + width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), p + width), dtype=torch.long)
            if p:
                ids[:, :p] = torch.tensor(self.prefix, dtype=torch.long)
                mask[:, :p] = 1
            for row, t in enumerate(tails):
                ids[row, p + width - len(t) :] = torch.tensor(t, dtype=torch.long)
                mask[row, p + width - len(t) :] = 1
            cache = None
            if p:
                cache = copy.deepcopy(self._prefix_cache)  # generate extends the cache in place
                cache.batch_repeat_interleave(len(prompts))
            chunked = self._eos is not None and len(prompts) > 1
            if chunked and cache is None:  # the cache generate would make itself, held here to continue from it
                from transformers import DynamicCache

                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                cache = DynamicCache(config=base.config.get_text_config(decoder=True))
                if not _droppable(cache):  # e.g. linear-attention layers: rows cannot be selected, one call
                    chunked, cache = False, None
            device = self._device()
            torch.manual_seed(seed)
            self.calls += 1
            t0 = time.perf_counter()
            if not chunked:
                extra = {_cache_kwarg(self.model): cache} if cache is not None else {}
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    pad_token_id=self.pad_id,
                    **extra,
                    **self.generation_kwargs,
                )
                rows = out[:, p + width :].tolist()
            else:
                rows = self._generate_chunked(ids.to(device), mask.to(device), cache)
            self.timings["generate"] += time.perf_counter() - t0
        finally:
            self.model.train(was_training)
        return rows

    def _generate_chunked(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> list[list[int]]:
        """``generate`` in calls of :data:`DECODE_CHUNK` new tokens, each continuing from the last one's cache; rows
        that produced an end-of-sequence token leave the batch (ids, mask and cache) before the next call."""
        kwargs = dict(self.generation_kwargs)
        total = kwargs.pop("max_new_tokens")
        owed = kwargs.pop("min_new_tokens", None) or 0
        live = list(range(ids.shape[0]))  # batch rows still generating, in the order of the current tensors
        new: list[list[int]] = [[] for _ in live]
        done = 0
        while live and done < total:
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=self.pad_id,
                max_new_tokens=min(DECODE_CHUNK, total - done),
                min_new_tokens=max(owed - done, 0),
                **{_cache_kwarg(self.model): cache},
                **kwargs,
            )
            step = out[:, ids.shape[1] :]
            keep = []
            for j, (row, tokens) in enumerate(zip(live, step.tolist())):
                end = next((k for k, t in enumerate(tokens) if t in self._eos), None)
                new[row] += tokens if end is None else tokens[: end + 1]
                if end is None:
                    keep.append(j)
            done += step.shape[1]
            if len(keep) < len(live) and keep and done < total:
                cache.batch_select_indices(torch.tensor(keep, device=ids.device))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], step.shape[1])], dim=1)[keep]
            ids, live = out[keep], [live[j] for j in keep]
        return [r + [self.pad_id] * (done - len(r)) for r in new]  # padded like one call's output


# transformers generate kwargs → vLLM SamplingParams fields
_VLLM_RENAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n"}
_VLLM_SAME = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed")


def vllm_sampling_kwargs(generation_kwargs: dict, seed: int) -> dict:
    """Map transformers-style generation kwargs to ``vllm.SamplingParams`` kwargs (greedy unless ``do_sample``)."""
    out: dict = {"seed": seed}
    unknown = []
    for key, value in generation_kwargs.items():
        if key == "do_sample":
            continue
        if key in _VLLM_RENAMES:
            out[_VLLM_RENAMES[key]] = value
        elif key in _VLLM_SAME:
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        allowed = sorted(["do_sample", *_VLLM_RENAMES, *_VLLM_SAME])
        raise ValueError(
            f"generation kwargs {unknown} have no vLLM equivalent; allowed with backend='vllm': {allowed}"
        )
    if not generation_kwargs.get("do_sample", False):
        out["temperature"] = 0.0  # vLLM's greedy decoding
    return out


def require_vllm() -> None:
    """Raise a clear ``ImportError`` when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "backend='vllm' needs the vllm package (GPU): pip install vllm — or use backend='transformers' "
            "(batched model.generate, the default)"
        )


class VLLMBackend:
    """Generation on vLLM's offline ``LLM`` engine (tensor parallelism, paged KV cache) when it is installed."""

    name = "vllm"

    def __init__(self, teacher, tokenizer, generation_kwargs: dict | None = None, **engine_kwargs):
        require_vllm()
        from vllm import LLM

        if isinstance(teacher, str):
            path = teacher
        else:
            path = getattr(teacher, "name_or_path", None) or getattr(teacher.config, "_name_or_path", None)
            if not path:
                raise ValueError(
                    "backend='vllm' loads the teacher itself: pass teacher as a Hub id or checkpoint path, or save "
                    "the model with save_pretrained first"
                )
        self.generation_kwargs = dict(generation_kwargs or {})
        vllm_sampling_kwargs(self.generation_kwargs, 0)  # validate before the engine starts
        self.tokenizer = tokenizer
        self.llm = LLM(model=str(path), **engine_kwargs)
        self.calls = 0

    def generate(self, prompts: list[list[int]], seed: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(**vllm_sampling_kwargs(self.generation_kwargs, seed))
        self.calls += 1
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


def make_backend(
    name: str,
    teacher,
    tokenizer,
    generation_kwargs: dict,
    engine_kwargs: dict | None = None,
    prefix_ids: Sequence[int] | None = None,
):
    """A generation backend by name (``"transformers"`` or ``"vllm"``); ``prefix_ids`` is the transformers path's
    shared prefix (vLLM caches prefixes itself with ``engine_kwargs={"enable_prefix_caching": True}``)."""
    if name == "transformers":
        if engine_kwargs:
            raise ValueError(f"engine_kwargs apply to backend='vllm' only, got {sorted(engine_kwargs)}")
        return TransformersBackend(teacher, tokenizer, generation_kwargs, prefix_ids=prefix_ids)
    if name == "vllm":
        if prefix_ids:
            raise ValueError(
                "prefix_ids apply to backend='transformers' only; vLLM caches shared prefixes itself "
                "(engine_kwargs={'enable_prefix_caching': True})"
            )
        return VLLMBackend(teacher, tokenizer, generation_kwargs, **(engine_kwargs or {}))
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[list[int]],
    *,
    batch_size: int = 16,
    seed: int = 0,
    add_special_tokens: bool = True,
    prefix_cache: bool = True,
    on_batch: Callable[[int, list[int], list[str]], None] | None = None,
    timings: dict | None = None,
    **generation_kwargs,
) -> list[str]:
    """Generate a continuation for every prompt (strings or token-id lists), batched by length; input order kept.

    ``batch_size=1, prefix_cache=False`` is the plain per-sample loop. ``prefix_cache``: prefill the prompts'
    common token prefix once and reuse its KV cache in every batch (same tokens as without it). Greedy unless
    ``do_sample=True`` is passed; any other ``model.generate`` keyword (``max_new_tokens``, ``temperature``,
    ``top_p`` …) passes through. ``timings`` (a dict) receives the wall seconds of the shared ``prefix_prefill``
    and of the ``generate`` calls.
    """
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
    ids = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        for p in prompts
    ]
    generation_kwargs.setdefault("do_sample", False)
    prefix = common_prefix(ids) if prefix_cache else []
    backend = TransformersBackend(model, tokenizer, generation_kwargs, prefix_ids=prefix)
    out: list[str | None] = [None] * len(ids)
    for b, batch in enumerate(length_buckets([len(x) for x in ids], batch_size)):
        texts = backend.generate([ids[i] for i in batch], batch_seed(seed, b))
        for i, t in zip(batch, texts):
            out[i] = t
        if on_batch is not None:
            on_batch(b, batch, texts)
    if timings is not None:
        timings.update(backend.timings)
    return out  # type: ignore[return-value]
