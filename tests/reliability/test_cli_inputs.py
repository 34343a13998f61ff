"""CLI and perplexity bad inputs: one line, exit 2, naming the flag, the value and what is allowed, before any model
loads (``load_model*`` are replaced by a tripwire) or any output is written."""

import pytest
import torch

import prune_peft.models as models
from prune_peft.cli import main
from prune_peft.evaluation import perplexity
from prune_peft.testing import byte_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm(num_hidden_layers=1).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", tripwire)
    monkeypatch.setattr(models, "load_model_and_tokenizer", tripwire)


@pytest.fixture(scope="module")
def no_columns(tmp_path_factory):
    from datasets import Dataset

    d = tmp_path_factory.mktemp("cols") / "ds"
    Dataset.from_dict({"question_text": ["a", "b"], "reply": ["c", "d"]}).save_to_disk(str(d))
    return d


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory):
    from datasets import Dataset

    d = tmp_path_factory.mktemp("long") / "ds"
    Dataset.from_dict({"prompt": ["x" * 64] * 4, "completion": [" yes"] * 4}).save_to_disk(str(d))
    return d


def cli(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# (case id, verb argv without --model/--out, regex naming the flag, the value and what is allowed)
CASES = [
    ("distill-temperature-zero", ["distill", "--do-sample", "--temperature", "0"], r"--temperature must be > 0, got 0"),
    ("distill-top-p", ["distill", "--do-sample", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    ("distill-top-k", ["distill", "--do-sample", "--top-k", "0"], r"--top-k must be a positive integer, got 0"),
    ("distill-sampling-greedy", ["distill", "--temperature", "0.7"], r"--temperature only apply to sampling.*--do-sample"),
    ("distill-max-new-tokens", ["distill", "--max-new-tokens", "0"], r"--max-new-tokens must be a positive integer, got 0"),
    ("distill-columns", ["distill", "--dataset", "{no_columns}"], r"--dataset.*column pairs.*'prompt', 'completion'.*it has \['question_text', 'reply'\]"),
    ("distill-cache-is-file", ["distill", "--cache-dir", "{a_file}"], r"--cache-dir=.*not a folder"),
    ("distill-n-zero", ["distill", "--n", "0"], r"--n must be a positive integer, got 0"),
    ("finetune-columns", ["finetune", "--data", "{no_columns}"], r"columns \['question_text', 'reply'\].*'text'.*'messages'.*'prompt' \+ 'completion'"),
    ("finetune-max-length", ["finetune", "--data", "{long_prompts}", "--max-length", "16"], r"--max-length 16 truncates every completion"),
    ("finetune-max-length-zero", ["finetune", "--max-length", "0"], r"--max-length must be a positive integer, got 0"),
    ("prune-seqlen-zero", ["prune", "--method", "magnitude", "--sparsity", "0.5", "--seqlen", "0"], r"--seqlen must be a positive integer, got 0"),
    ("prune-seqlen-one", ["prune", "--method", "magnitude", "--sparsity", "0.5", "--seqlen", "1"], r"--seqlen must be >= 2, got 1"),
    ("eval-seqlen-zero", ["eval", "--seqlen", "0"], r"--seqlen must be a positive integer, got 0"),
    ("eval-seqlen-one", ["eval", "--seqlen", "1"], r"--seqlen must be >= 2.*got 1"),
]  # fmt: skip


@pytest.mark.parametrize("argv,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_before_the_model_loads(
    capsys, tmp_path, tiny_folder, no_columns, long_prompts, no_model_load, argv, match
):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    fill = {"no_columns": no_columns, "long_prompts": long_prompts, "a_file": a_file}
    argv = [a.format(**fill) for a in argv]
    verb = argv[0]
    model_flag = {"distill": "--teacher"}.get(verb, "--model")
    extra = [model_flag, str(tiny_folder)]
    out = [] if verb == "eval" else ["--out", str(tmp_path / "out")]
    err = cli(capsys, [*argv, *extra, *out])
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- perplexity

IDS = torch.randint(0, 260, (64,), generator=torch.Generator().manual_seed(0))

PPL_CASES = [
    ("seqlen-zero", dict(tokens=IDS, seqlen=0), r"seqlen must be an integer >= 2.*got 0"),
    ("seqlen-one", dict(tokens=IDS, seqlen=1), r"seqlen must be an integer >= 2.*got 1"),
    ("seqlen-float", dict(tokens=IDS, seqlen=8.0), r"seqlen.*got 8.0"),
    ("stride-zero", dict(tokens=IDS, seqlen=8, stride=0), r"stride must be an integer in \[1, seqlen=8\].*got 0"),
    ("stride-long", dict(tokens=IDS, seqlen=8, stride=9), r"stride.*\[1, seqlen=8\].*got 9"),
    ("max-windows", dict(tokens=IDS, seqlen=8, max_windows=0), r"max_windows must be a positive integer or None"),
    ("batch-size", dict(tokens=IDS, seqlen=8, batch_size=0), r"batch_size must be a positive integer, got 0"),
    ("float-ids", dict(tokens=IDS.float(), seqlen=8), r"tokens must hold integer token ids, got dtype torch.float32"),
    ("bool-ids", dict(tokens=IDS > 3, seqlen=8), r"tokens must hold integer.*torch.bool"),
    ("vocab", dict(tokens=IDS + 300, seqlen=8), r"tokens hold ids in \[\d+, \d+\].*allows \[0, 260\)"),
    ("negative", dict(tokens=IDS - 300, seqlen=8), r"tokens hold ids in \[-\d+, -?\d+\]"),
    ("one-token", dict(tokens=IDS[:1], seqlen=8), r"tokens has 1 element.*at least 2"),
    ("empty-text", dict(texts=[""], seqlen=8), r"texts.*empty"),
    ("blank-text", dict(texts=["   ", "\n"], seqlen=8), r"texts.*empty"),
    ("no-input", dict(seqlen=8), r"tokens= or texts="),
]


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in PPL_CASES], ids=[c[0] for c in PPL_CASES])
def test_perplexity_refuses_before_the_first_forward(kwargs, match):
    model = _Counting(tiny_causal_lm(num_hidden_layers=1))
    tok = byte_tokenizer() if "texts" in kwargs else None
    with pytest.raises(ValueError, match=match):
        perplexity(model, tok, **kwargs)
    assert model.calls == 0


def test_perplexity_valid_call_still_works():
    assert perplexity(tiny_causal_lm(num_hidden_layers=1), tokens=IDS, seqlen=16) > 1
