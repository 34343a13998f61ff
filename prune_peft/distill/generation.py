"""Batched generation backends for self-distillation: the model's own ``generate`` (default) or vLLM.

The transformers path sorts prompts by length into buckets (little padding), left-pads them (a decoder continues
from the last position, so real tokens must end every row) and seeds torch per batch, so a batch's output does not
depend on which batches ran before it — what makes an interrupted run resume to the same result.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "BACKENDS",
    "TransformersBackend",
    "VLLMBackend",
    "batch_seed",
    "generate_texts",
    "length_buckets",
    "make_backend",
    "require_vllm",
    "vllm_sampling_kwargs",
]

BACKENDS = ("transformers", "vllm")


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed for one batch: distinct across (seed, batch) pairs, independent of run order."""
    return (seed * 1_000_003 + batch_index) % (2**63 - 1)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties by index: deterministic)."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_token_id(tokenizer, model=None) -> int:
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(cand, int):
            return cand
    raise ValueError("tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")


class TransformersBackend:
    """Left-padded batched ``model.generate``; ``generation_kwargs`` pass straight through."""

    name = "transformers"

    def __init__(self, model, tokenizer, generation_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_kwargs = dict(generation_kwargs or {})
        self.pad_id = _pad_token_id(tokenizer, model)
        self.calls = 0  # number of generate() calls (tests count recomputation with it)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[str]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            self.calls += 1
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                pad_token_id=self.pad_id,
                **self.generation_kwargs,
            )
        finally:
            self.model.train(was_training)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


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


def make_backend(name: str, teacher, tokenizer, generation_kwargs: dict, engine_kwargs: dict | None = None):
    """A generation backend by name (``"transformers"`` or ``"vllm"``)."""
    if name == "transformers":
        if engine_kwargs:
            raise ValueError(f"engine_kwargs apply to backend='vllm' only, got {sorted(engine_kwargs)}")
        return TransformersBackend(teacher, tokenizer, generation_kwargs)
    if name == "vllm":
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
    on_batch: Callable[[int, list[int], list[str]], None] | None = None,
    **generation_kwargs,
) -> list[str]:
    """Generate a continuation for every prompt (strings or token-id lists), batched by length; input order kept.

    ``batch_size=1`` is the plain per-sample loop. Greedy unless ``do_sample=True`` is passed; any other
    ``model.generate`` keyword (``max_new_tokens``, ``temperature``, ``top_p`` …) passes through.
    """
    ids = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        for p in prompts
    ]
    generation_kwargs.setdefault("do_sample", False)
    backend = TransformersBackend(model, tokenizer, generation_kwargs)
    out: list[str | None] = [None] * len(ids)
    for b, batch in enumerate(length_buckets([len(x) for x in ids], batch_size)):
        texts = backend.generate([ids[i] for i in batch], batch_seed(seed, b))
        for i, t in zip(batch, texts):
            out[i] = t
        if on_batch is not None:
            on_batch(b, batch, texts)
    return out  # type: ignore[return-value]
