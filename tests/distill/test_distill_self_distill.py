import json
import re

import pytest
import torch
from datasets import Dataset, load_from_disk

from prune_peft.distill import TEMPLATES, DistillTemplate, build_prompt, distill_stats, generate_texts, self_distill
from prune_peft.distill.generation import length_buckets, vllm_sampling_kwargs
from prune_peft.sft_data import arithmetic_problems, to_messages


def _question(prompt_text: str) -> str:
    """The question inside a math rewrite prompt (the tests' questions are 'Q<k>: ...')."""
    return re.search(r"Q\d+:[^\n<]*", prompt_text).group(0)


MATH_ROWS = [
    {"prompt": "Q1: what is 2+3?", "completion": "2 + 3 = 5\n#### 5", "answer": 5},
    {"prompt": "Q2: what is 4*4? Please show the work in detail", "completion": "4 * 4 = 16\n#### 16", "answer": 16},
    {"prompt": "Q3: what is 9-1?", "completion": "9 - 1 = 8\n#### 8", "answer": 8},
    {"prompt": "Q4: what is 7+7, a longer question here?", "completion": "7 + 7 = 14\n#### 14", "answer": 14},
    {"prompt": "Q5: what is 1+1?", "completion": "1 + 1 = 2\n#### 2", "answer": 2},
]
REPLIES = {
    "Q1": "Two plus three makes 5.",  # correct → accepted
    "Q2": "Four fours are 15.",  # wrong answer → original kept
    "Q3": "As the reference answer says, 8.",  # bad phrase → original kept
    "Q4": "Seven and seven: 14",  # correct
    "Q5": "   ",  # empty → original kept
}


def _script(text):
    return REPLIES[_question(text).split(":")[0]]


def test_math_template_prompt_chat_and_plain(tokenizer):
    chat = build_prompt(tokenizer, "math", "Q1: what?", "ref 5", chat=True)
    assert chat.startswith("<|system|>\n" + TEMPLATES["math"].system)
    assert "<|user|>\nQ1: what?\n\nref 5</s>" in chat
    assert chat.endswith("<|assistant|>\nGreat! Let's think step by step. ")
    plain = build_prompt(tokenizer, "math", "Q1: what?", "ref 5", chat=False)
    assert plain == (
        TEMPLATES["math"].system + "\n\n### Question:\nQ1: what?\n\n### Reference Answer:\nref 5\n\n### Response:\n"
        "Great! Let's think step by step. "
    )
    general = build_prompt(tokenizer, "general", "Say hi", "hi", chat=False)
    assert general.endswith("### Instruction:\nSay hi\n\n### Reference Answer:\nhi\n\n### Response:\n")


def test_math_filter_keeps_rewrite_only_when_it_passes(tokenizer, scripted):
    teacher = scripted(tokenizer, _script)
    out = self_distill(teacher, tokenizer, Dataset.from_list(MATH_ROWS), template="math", batch_size=2, progress=False)
    assert out["completion"] == [
        "Two plus three makes 5.",
        "4 * 4 = 16\n#### 16",
        "9 - 1 = 8\n#### 8",
        "Seven and seven: 14",
        "1 + 1 = 2\n#### 2",
    ]
    assert out["distill_accepted"] == [True, False, False, True, False]
    assert out["distill_reason"][1] == "answer 15 != gold 16"
    assert out["distill_reason"][2] == "contains 'reference answer'"
    assert out["distill_reason"][4] == "empty"
    assert out["answer"] == [5, 16, 8, 14, 2]  # other columns untouched
    stats = distill_stats(out)
    assert stats["rows"] == 5 and stats["accepted"] == 2 and stats["acceptance_rate"] == pytest.approx(0.4)
    assert stats["reject_reasons"] == {"answer mismatch": 1, "contains 'reference answer'": 1, "empty": 1}


def test_gold_from_response_when_no_answer_column_and_custom_checks(tokenizer, scripted):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in MATH_ROWS]
    teacher = scripted(tokenizer, _script)
    out = self_distill(teacher, tokenizer, rows, template="math", batch_size=5, progress=False)
    assert out["distill_accepted"] == [True, False, False, True, False]

    def short(example, rewrite):
        return len(rewrite) < 20 or f"too long ({len(rewrite)})"

    out = self_distill(teacher, tokenizer, rows, template="math", filter=[short], progress=False, keep_metadata=False)
    assert out.column_names == ["prompt", "completion"]
    assert out["completion"][0] == MATH_ROWS[0]["completion"]  # 23 chars → rejected by the custom check
    assert out["completion"][3] == "Seven and seven: 14"


def test_batches_are_length_bucketed_left_padded_and_kwargs_pass_through(tokenizer, scripted):
    teacher = scripted(tokenizer, _script)
    self_distill(
        teacher, tokenizer, MATH_ROWS, template="math", batch_size=2, progress=False,
        max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9,
    )  # fmt: skip
    assert len(teacher.calls) == 3
    lengths = []
    for call in teacher.calls:
        assert {"max_new_tokens": 7, "do_sample": True, "temperature": 0.7, "top_p": 0.9}.items() <= call.items()
        mask = call["attention_mask"]
        assert torch.all(mask[:, -1] == 1)  # real tokens end every row: left padding
        assert torch.all(mask[:, 1:] >= mask[:, :-1])  # zeros only before ones
        lengths.append(mask.sum(1).tolist())
    flat = [n for batch in lengths for n in batch]
    assert flat == sorted(flat, reverse=True)  # longest first, so batches hold similar lengths
    assert length_buckets([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]


def test_batched_generation_equals_per_sample_loop(tiny_model, tokenizer):
    model = tiny_model("llama", seed=0)
    prompts = ["a", "hello there", "xyz", "a much longer prompt than the others", "mid size"]
    batched = generate_texts(model, tokenizer, prompts, batch_size=4, max_new_tokens=6)
    single = generate_texts(model, tokenizer, prompts, batch_size=1, max_new_tokens=6)
    assert batched == single and all(len(t) > 0 for t in batched)


def test_seeded_sampling_is_deterministic(tiny_model, tokenizer):
    model = tiny_model("llama", seed=0)
    ds = arithmetic_problems(4, seed=0)
    kw = dict(template="math", filter="none", batch_size=4, progress=False, max_new_tokens=6, do_sample=True)
    a = self_distill(model, tokenizer, ds, seed=1, **kw)["distill_rewrite"]
    b = self_distill(model, tokenizer, ds, seed=1, **kw)["distill_rewrite"]
    c = self_distill(model, tokenizer, ds, seed=2, **kw)["distill_rewrite"]
    assert a == b and a != c


class _Stop(Exception):
    pass


def _count_batches(model) -> dict:
    """Wrap ``model.generate`` to count the batches it starts: a batch is decoded a few tokens per call, and only
    its first call has more than one token the cache lacks (later calls continue with the one newest token)."""
    calls = {"n": 0}
    generate = model.generate

    def counting_generate(*a, **k):
        cache = k.get("cache")
        calls["n"] += k["input_ids"].shape[1] - (cache.get_seq_length() if cache is not None else 0) > 1
        return generate(*a, **k)

    model.generate = counting_generate
    return calls


def test_interrupted_run_resumes_without_recompute_or_duplicates(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama", seed=0)
    ds = arithmetic_problems(7, seed=0)
    kw = dict(template="math", filter="none", batch_size=2, progress=False, max_new_tokens=6, do_sample=True, seed=3)
    reference = self_distill(model, tokenizer, ds, **kw)  # uninterrupted, no cache

    calls = _count_batches(model)

    def stop_after_two(batch_index, rows_done):
        if rows_done >= 4:
            raise _Stop

    with pytest.raises(_Stop):
        self_distill(model, tokenizer, ds, cache_dir=tmp_path / "c", on_batch=stop_after_two, **kw)
    assert calls["n"] == 2
    assert len(list((tmp_path / "c" / "shards").iterdir())) == 2
    resumed = self_distill(model, tokenizer, ds, cache_dir=tmp_path / "c", **kw)
    assert calls["n"] == 4  # 4 batches of 7 rows: only the missing 2 were generated
    assert resumed.to_list() == reference.to_list()  # same rewrites, same order, no duplicates
    shard_rows = [i for s in (tmp_path / "c" / "shards").iterdir() for i in load_from_disk(str(s))["index"]]
    assert sorted(shard_rows) == list(range(7))
    again = self_distill(model, tokenizer, ds, cache_dir=tmp_path / "c", **kw)
    assert calls["n"] == 4 and again.to_list() == reference.to_list()  # fully cached: no generate at all
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert stats["rows"] == 7


def test_crash_inside_generate_keeps_finished_batches(tokenizer, scripted, tmp_path):
    teacher = scripted(tokenizer, _script, fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        self_distill(teacher, tokenizer, MATH_ROWS, template="math", batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(teacher.calls) == 1
    teacher.fail_on_call = None
    out = self_distill(
        teacher, tokenizer, MATH_ROWS, template="math", batch_size=2, cache_dir=tmp_path, progress=False
    )
    assert len(teacher.calls) == 3  # 1 before the crash + the 2 batches that were missing
    assert out["distill_accepted"] == [True, False, False, True, False]


def test_changed_configuration_invalidates_the_cache(tiny_model, tokenizer, tmp_path):
    ds = arithmetic_problems(3, seed=0)
    kw = dict(filter="none", batch_size=3, progress=False, max_new_tokens=4)
    self_distill(tiny_model("llama", seed=0), tokenizer, ds, template="math", cache_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"holds a different configuration \(differs in: \['teacher'\]\)"):
        self_distill(tiny_model("llama", seed=1), tokenizer, ds, template="math", cache_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"differs in: \['prompts', 'template'\]"):
        self_distill(tiny_model("llama", seed=0), tokenizer, ds, template="general", cache_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"differs in: \['generation_kwargs'\]"):
        self_distill(
            tiny_model("llama", seed=0), tokenizer, ds, template="math", cache_dir=tmp_path,
            **{**kw, "max_new_tokens": 5},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"differs in: \['prompts', 'rows'\]"):
        self_distill(
            tiny_model("llama", seed=0), tokenizer, ds.select([0, 1]), template="math", cache_dir=tmp_path, **kw
        )
    model = tiny_model("llama", seed=1)
    calls = _count_batches(model)
    self_distill(model, tokenizer, ds, template="math", cache_dir=tmp_path, overwrite=True, **kw)
    assert calls["n"] == 1  # recomputed for the new teacher
    self_distill(model, tokenizer, ds, template="math", cache_dir=tmp_path, **kw)
    assert calls["n"] == 1  # and the new cache is reused


def test_foreign_cache_dir_is_refused(tiny_model, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no self_distill cache"):
        self_distill(tiny_model("llama"), tokenizer, arithmetic_problems(2), template="math", cache_dir=tmp_path)


def test_plain_prompt_when_tokenizer_has_no_chat_template(tokenizer, scripted):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    seen = []

    def script(text):
        seen.append(text)
        return _script(text)

    out = self_distill(scripted(tok, script), tok, MATH_ROWS[:1], template="math", progress=False)
    assert seen[0].startswith("<s>" + TEMPLATES["math"].system)  # plain format + the tokenizer's BOS
    assert "### Question:\nQ1: what is 2+3?" in seen[0] and out["distill_accepted"] == [True]
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        self_distill(scripted(tok, script), tok, MATH_ROWS, template="math", chat_template=True)


def test_template_that_does_not_fit_the_chat_format(tokenizer, scripted):
    import copy

    no_system = copy.deepcopy(tokenizer)
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    )
    teacher = scripted(no_system, _script)
    with pytest.raises(ValueError, match=r"does not fit the tokenizer's chat template.*System role not supported"):
        self_distill(teacher, no_system, MATH_ROWS, template="math")
    assert teacher.calls == []
    dropping = copy.deepcopy(tokenizer)
    dropping.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="drops the system message"):
        self_distill(scripted(dropping, _script), dropping, MATH_ROWS, template="math")
    # a custom template without a system message fits
    tpl = DistillTemplate("nosys", None, "{instruction}\n\nReference: {reference}", "{instruction} {reference}")
    out = self_distill(teacher, no_system, MATH_ROWS[:1], template=tpl, filter="math", progress=False)
    assert out["distill_accepted"] == [True]


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([{"text": "a", "label": 1}], {}, r"needs an instruction and a response field.*it has \['text', 'label'\]"),
        ([{"prompt": "a", "completion": "b"}], {"response_column": "output"}, r"response_column='output' is not"),
        ([{"prompt": "a", "completion": "b"}], {"answer_column": "gold"}, "answer_column='gold' is not a column"),
        ([{"prompt": "a", "completion": "no number"}], {"template": "math"}, "math filter needs gold answers"),
        ([{"prompt": "a", "completion": "b"}], {"template": "poem"}, r"template must be one of \['general'"),
        ([{"prompt": "a", "completion": "b"}], {"filter": "strict"}, r"filter must be one of \['general', 'math'"),
        ([{"prompt": "a", "completion": "b"}], {"batch_size": 0}, "batch_size must be a positive integer"),
        (
            [{"prompt": "a", "completion": "b"}],
            {"backend": "tgi"},
            r"backend must be one of \['transformers', 'vllm'\]",
        ),
        ([], {}, "dataset is empty"),
    ],
)
def test_bad_input_raises_before_generation(tokenizer, scripted, rows, kwargs, match):
    teacher = scripted(tokenizer, lambda t: "x")
    with pytest.raises(ValueError, match=match):
        self_distill(
            teacher, tokenizer, Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": []}), **kwargs
        )
    assert teacher.calls == []


def test_bad_custom_template_fields():
    with pytest.raises(ValueError, match=r"user must use the fields \{instruction\} and \{reference\}"):
        self_distill(
            None, None, [{"prompt": "a", "completion": "b"}], template=DistillTemplate("t", None, "{q}", "{q}")
        )


def test_conversational_and_alpaca_fields(tokenizer, scripted):
    seen = []

    def script(text):
        seen.append(text)
        return "Rewritten 5"

    conv = to_messages(Dataset.from_list([{"prompt": "Q1: 2+3?", "completion": "5"}]))
    out = self_distill(scripted(tokenizer, script), tokenizer, conv, template="general", progress=False)
    assert out["completion"][0] == [{"role": "assistant", "content": "Rewritten 5"}]
    assert "### Instruction:\nQ1: 2+3?\n\n### Reference Answer:\n5" in seen[-1]
    alpaca = [{"instruction": "Add", "input": "2 and 3", "output": "5"}]
    out = self_distill(scripted(tokenizer, script), tokenizer, alpaca, template="general", progress=False)
    assert out["output"] == ["Rewritten 5"] and "### Instruction:\nAdd\n\n2 and 3\n\n" in seen[-1]


def test_vllm_backend_missing_gives_clear_error(tokenizer, scripted):
    teacher = scripted(tokenizer, _script)
    with pytest.raises(ImportError, match=r"backend='vllm' needs the vllm package.*pip install vllm"):
        self_distill(teacher, tokenizer, MATH_ROWS, template="math", backend="vllm")
    assert teacher.calls == []


def test_vllm_sampling_kwargs_mapping():
    assert vllm_sampling_kwargs({"max_new_tokens": 9, "do_sample": False}, 4) == {
        "seed": 4,
        "max_tokens": 9,
        "temperature": 0.0,
    }
    assert vllm_sampling_kwargs({"do_sample": True, "temperature": 0.8, "top_p": 0.9, "min_new_tokens": 2}, 1) == {
        "seed": 1,
        "temperature": 0.8,
        "top_p": 0.9,
        "min_tokens": 2,
    }
    with pytest.raises(ValueError, match=r"\['num_beams'\] have no vLLM equivalent"):
        vllm_sampling_kwargs({"num_beams": 4}, 0)
