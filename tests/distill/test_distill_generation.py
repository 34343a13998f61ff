"""Shared-prefix KV caching in batched self-distillation generation: same tokens as the per-sample loop."""

import pytest
import torch

from prune_peft.distill import TEMPLATES, build_prompt, generate_texts
from prune_peft.distill.generation import TransformersBackend, common_prefix, length_buckets
from prune_peft.sft_data import arithmetic_problems
from prune_peft.testing import ARCHS, byte_tokenizer, tiny_causal_lm

GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}  # fixed length: rows compare token by token


def _prompts(tok, n=7):
    ds = arithmetic_problems(n, seed=3)
    texts = [build_prompt(tok, TEMPLATES["math"], q, a, True) for q, a in zip(ds["prompt"], ds["completion"])]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _ids_by_loop(model, tok, prompts):
    backend = TransformersBackend(model, tok, GREEDY)  # no prefix: the plain per-sample loop
    return [backend.generate_ids([p], 0)[0] for p in prompts]


def _ids_batched(model, tok, prompts, batch_size, prefix):
    backend = TransformersBackend(model, tok, GREEDY, prefix_ids=prefix)
    out = [None] * len(prompts)
    for b, batch in enumerate(length_buckets([len(p) for p in prompts], batch_size)):
        for i, row in zip(batch, backend.generate_ids([prompts[i] for i in batch], b)):
            out[i] = row
    return out, backend


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cached_batches_match_the_per_sample_loop_token_for_token(arch):
    torch.manual_seed(0)
    model, tok = tiny_causal_lm(arch, max_position_embeddings=1024), byte_tokenizer()
    prompts = _prompts(tok)
    prefix = common_prefix(prompts)
    assert len(prefix) > 100  # the math template's system prompt and chat markup
    loop = _ids_by_loop(model, tok, prompts)
    batched, backend = _ids_batched(model, tok, prompts, 3, prefix)
    assert backend.prefix == prefix  # the prefix cache was really used, not silently switched off
    assert batched == loop
    assert all(len(r) == GREEDY["max_new_tokens"] for r in loop)


def test_prefix_is_prefilled_once_and_batches_run_only_their_tails():
    torch.manual_seed(0)
    model, tok = tiny_causal_lm("llama", max_position_embeddings=1024), byte_tokenizer()
    prompts = _prompts(tok, 6)
    prefix = common_prefix(prompts)
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape))
    try:
        _, backend = _ids_batched(model, tok, prompts, 3, prefix)
    finally:
        hook.remove()
    tail = max(len(p) for p in prompts) - len(prefix)
    assert widths[0] == (1, len(prefix))  # the one shared prefill
    assert all(w[1] <= tail for w in widths[1:])  # every batch embeds only its tail, then one token per step
    assert sum(w[1] == len(prefix) for w in widths) == 1
    assert backend.timings["prefix_prefill"] > 0 and backend.timings["generate"] > 0


def test_generate_texts_with_and_without_prefix_cache_agree():
    torch.manual_seed(0)
    model, tok = tiny_causal_lm("llama", max_position_embeddings=1024), byte_tokenizer()
    prompts = _prompts(tok, 5)
    timings = {}
    cached = generate_texts(model, tok, prompts, batch_size=5, timings=timings, **GREEDY)
    loop = generate_texts(model, tok, prompts, batch_size=1, prefix_cache=False, **GREEDY)
    assert cached == loop
    assert timings["prefix_prefill"] > 0
    with pytest.raises(ValueError, match="prefix_cache"):
        generate_texts(model, tok, prompts, prefix_cache="yes", **GREEDY)


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    # one token short of the shortest prompt: generate needs an uncached token for the first logits
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert common_prefix([[1, 2, 3]]) == []
    assert common_prefix([[5, 1], [6, 1]]) == []


def test_prompt_without_the_prefix_is_rejected_before_any_work():
    model, tok = tiny_causal_lm("llama"), byte_tokenizer()
    backend = TransformersBackend(model, tok, GREEDY, prefix_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"prompts \[1\] do not start with prefix_ids"):
        backend.generate_ids([[1, 2, 3, 4], [1, 2, 4, 4]], 0)
    assert backend.calls == 0 and backend._prefix_cache is None
    with pytest.raises(ValueError, match="'cache'"):
        TransformersBackend(model, tok, {"cache": None})


def test_self_distill_rewrites_are_the_same_with_the_prefix_cache():
    from prune_peft.distill import self_distill

    torch.manual_seed(0)
    model, tok = tiny_causal_lm("llama", max_position_embeddings=1024), byte_tokenizer()
    ds = arithmetic_problems(4, seed=5)
    runs = {
        flag: self_distill(
            model, tok, ds, template="math", filter="none", batch_size=2, prefix_cache=flag, progress=False, **GREEDY
        )["distill_rewrite"]
        for flag in (True, False)
    }
    assert runs[True] == runs[False]
    with pytest.raises(ValueError, match="prefix_cache must be True or False"):
        self_distill(model, tok, ds, template="math", prefix_cache=1, progress=False)


def test_vllm_backend_refuses_prefix_ids():
    from prune_peft.distill.generation import make_backend

    with pytest.raises(ValueError, match="prefix_ids apply to backend='transformers' only"):
        make_backend("vllm", "some/model", byte_tokenizer(), {}, prefix_ids=[1, 2])


def _eos_that_stops_rows_at_different_steps(model, tok, prompts, steps):
    """A token the greedy loop emits in some rows (at different steps) and never in others: as end-of-sequence id
    it makes rows finish at different times, the case where the batch drops finished rows."""
    free = TransformersBackend(model, tok, {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False})
    rows = [free.generate_ids([p], 0)[0] for p in prompts]
    for t in sorted({t for r in rows for t in r[1:-1]}):
        firsts = {r.index(t) for r in rows if t in r}
        if len(firsts) >= 2 and min(firsts) >= 1 and any(t not in r for r in rows):
            return t
    raise AssertionError("the seeded tiny model emitted no token that stops rows at different steps")


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_finished_rows_leave_the_batch_and_tokens_match_the_loop(monkeypatch, prefix_cache):
    from prune_peft.distill import generation

    monkeypatch.setattr(generation, "DECODE_CHUNK", 3)  # several chunks within a short generation
    torch.manual_seed(0)
    model, tok = tiny_causal_lm("llama", max_position_embeddings=1024), byte_tokenizer()
    prompts = _prompts(tok, 6)
    steps = 12
    eos = _eos_that_stops_rows_at_different_steps(model, tok, prompts, steps)
    kw = {"max_new_tokens": steps, "eos_token_id": eos, "do_sample": False}
    loop = [TransformersBackend(model, tok, kw).generate_ids([p], 0)[0] for p in prompts]
    ends = [r.index(eos) if eos in r else steps for r in loop]
    assert len(set(ends)) >= 2 and max(ends) == steps  # rows stop at different steps, some run to the end

    rows_per_step = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: rows_per_step.append(args[0].shape[0]) if args[0].shape[1] == 1 else None
    )
    try:
        backend = TransformersBackend(model, tok, kw, prefix_ids=common_prefix(prompts) if prefix_cache else None)
        batched = backend.generate_ids(prompts, 0)
    finally:
        hook.remove()
    # same tokens up to each row's end; after it, the pad id (a one-call generate pads finished rows the same way)
    assert [r[: e + 1] for r, e in zip(batched, ends)] == [r[: e + 1] for r, e in zip(loop, ends)]
    assert all(set(r[e + 1 :]) <= {backend.pad_id} for r, e in zip(batched, ends))
    assert len({len(r) for r in batched}) == 1
    # decode steps ran on fewer rows once rows had finished: fewer row-steps than batch x steps
    assert rows_per_step[0] == len(prompts) and min(rows_per_step) < len(prompts)
    assert sum(rows_per_step) < len(prompts) * (steps - 1)
