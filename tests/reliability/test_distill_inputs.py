"""self_distill: a bad generation argument is refused before anything is written, so the corrected rerun works."""

import pytest

from prune_peft.distill import self_distill
from prune_peft.testing import byte_tokenizer, tiny_causal_lm

ROWS = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(3)]
KW = dict(template="general", batch_size=2, progress=False, max_new_tokens=2)

# (case id, bad generation kwargs, regex: the argument's name and what is allowed)
GEN_CASES = [
    ("max-new-tokens-zero", dict(max_new_tokens=0), "max_new_tokens.*0"),
    ("max-new-tokens-negative", dict(max_new_tokens=-3), "max_new_tokens.*non-negative integer.*-3"),
    ("max-new-tokens-str", dict(max_new_tokens="many"), "max_new_tokens.*non-negative integer.*'many'"),
    ("top-k-float", dict(top_k=2.5), "top_k.*non-negative integer.*2.5"),
    ("typo", dict(tempurature=0.7), r"\['tempurature'\].*allowed: GenerationConfig fields"),
    ("early-stopping", dict(early_stopping="sometimes"), "early_stopping.*sometimes"),
    ("cache-impl", dict(cache_implementation="bogus"), "cache_implementation.*bogus"),
]


@pytest.fixture(scope="module")
def teacher():
    return tiny_causal_lm(num_hidden_layers=1)


@pytest.mark.parametrize("bad,match", [c[1:] for c in GEN_CASES], ids=[c[0] for c in GEN_CASES])
def test_bad_generation_argument_refused_before_the_cache(teacher, tmp_path, bad, match):
    tok = byte_tokenizer()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=match):
        self_distill(teacher, tok, ROWS, cache_dir=cache, **{**KW, **bad})
    assert not cache.exists() or not any(cache.iterdir())  # nothing written: no config that pins the cache
    out = self_distill(teacher, tok, ROWS, cache_dir=cache, **KW)  # the corrected rerun, without overwrite
    assert len(out) == len(ROWS) and (cache / "config.json").exists()


class _Boom:
    """A stopping criterion that fails inside the first generate call (passes every up-front check)."""

    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("simulated failure inside generate")


def test_failure_before_the_first_batch_does_not_pin_the_cache(teacher, tmp_path):
    from transformers import StoppingCriteriaList

    tok = byte_tokenizer()
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated"):
        self_distill(teacher, tok, ROWS, cache_dir=cache, stopping_criteria=StoppingCriteriaList([_Boom()]), **KW)
    assert (cache / "config.json").exists() and not any((cache / "shards").iterdir())
    out = self_distill(teacher, tok, ROWS, cache_dir=cache, **KW)  # other settings: no stored batch to protect
    assert len(out) == len(ROWS)


def test_a_cache_with_stored_batches_is_still_protected(teacher, tmp_path):
    tok = byte_tokenizer()
    cache = tmp_path / "cache"
    self_distill(teacher, tok, ROWS, cache_dir=cache, **KW)
    shards = sorted(p.name for p in (cache / "shards").iterdir())
    with pytest.raises(ValueError, match=r"different configuration.*max_new_tokens|generation_kwargs"):
        self_distill(teacher, tok, ROWS, cache_dir=cache, **{**KW, "max_new_tokens": 3})
    assert sorted(p.name for p in (cache / "shards").iterdir()) == shards


def test_vllm_generation_names_checked_up_front(teacher, tmp_path):
    from prune_peft.distill.self_distill import _check_generation_kwargs

    with pytest.raises(ValueError, match=r"\['num_beams'\].*allowed with backend='vllm'"):
        _check_generation_kwargs({"num_beams": 2}, "vllm", teacher)
