"""self_distill with a teacher given as a path (it loads the model and tokenizer itself)."""

import pytest


@pytest.fixture
def saved_teacher(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "teacher"
    tiny_model("llama", seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_self_distill_accepts_a_teacher_path(saved_teacher):
    from prune_peft.distill import self_distill

    out = self_distill(
        saved_teacher, None, [{"prompt": "Q: 1+1?", "completion": "2"}], max_new_tokens=3, progress=False
    )
    assert len(out) == 1 and isinstance(out["distill_rewrite"][0], str)
    with pytest.raises(ValueError, match="tokenizer is required when teacher is a model object"):
        self_distill(object(), None, [{"prompt": "a", "completion": "b"}])
