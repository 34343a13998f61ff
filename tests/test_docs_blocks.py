"""Every code block of README.md and docs/*.md runs as written (tests/docs_blocks_lib.py says how).

One test per document runs its blocks in document order in one working directory; a block the test cannot run
carries a visible ``<!-- docs-test: skip (why) -->`` marker, and a tiny model replaces SmolLM2 only where the
block's marker says ``model=tiny-llama``.
"""

from __future__ import annotations

import pytest
import torch
from docs_blocks_lib import LANGS, ROOT, doc_files, extract, run_block, stray_markers

DOCS = doc_files()


def _has_runnable_blocks(doc) -> bool:
    try:
        return any(b.runs for b in extract(doc))
    except ValueError:  # a malformed marker: test_markers_are_well_formed reports it, this one fails on it too
        return True


RUNNABLE = [doc for doc in DOCS if _has_runnable_blocks(doc)]


def _id(doc) -> str:
    return str(doc.relative_to(ROOT))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the byte tokenizer, saved like a Hub checkpoint (what model=tiny-llama loads)."""
    from prune_peft.testing import byte_tokenizer, tiny_causal_lm

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    # 8 blocks so that layer-drop examples (n=6) leave a model; long positions for 2048-token calibration windows;
    # MLP width 256 so that channel_multiple=64 examples have whole groups to prune.
    model = tiny_causal_lm("llama", seed=0, num_hidden_layers=8, intermediate_size=256, max_position_embeddings=4096)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_markers_are_well_formed(doc):
    """Every fence has a known language, every marker parses and sits right above a block, skips say why."""
    blocks = extract(doc)  # raises ValueError on a marker it cannot parse
    assert stray_markers(doc) == [], f"{_id(doc)}: docs-test markers not directly above a code block"
    for b in blocks:
        assert b.lang in LANGS, f"{b.where}: fence language {b.lang!r}; label it one of {LANGS}"
        if b.marker.skip is not None:
            assert len(b.marker.skip.split()) >= 2, f"{b.where}: skip reason {b.marker.skip!r} does not say why"
        if b.lang in ("yaml", "json"):
            assert b.marker.file or b.marker.skip, f"{b.where}: a {b.lang} block needs file=NAME (or skip (why))"
        if b.lang == "text":
            assert b.marker.raw == "", f"{b.where}: text blocks are not run; their marker would do nothing"


@pytest.mark.parametrize("doc", RUNNABLE, ids=_id)
def test_blocks_run_as_written(doc, tiny_llama_dir, tmp_path):
    blocks = [b for b in extract(doc) if b.runs]
    assert blocks
    for block in blocks:
        torch.manual_seed(0)
        try:
            run_block(block, tmp_path, tiny_llama_dir)
        except BaseException as exc:  # SystemExit from a CLI/argparse included
            raise AssertionError(f"{block.where} ({block.lang}) failed: {type(exc).__name__}: {exc}") from exc


def test_marker_grammar_rejects_what_it_cannot_apply(tmp_path):
    from docs_blocks_lib import Block, Marker, parse_marker, substituted

    m = parse_marker(" model=tiny-llama; replace `max_steps=100` with `max_steps=2`; skip (needs a CUDA GPU) ")
    assert (m.model, m.replacements, m.skip) == ("tiny-llama", [("max_steps=100", "max_steps=2")], "needs a CUDA GPU")
    for bad in ("skip ()", "skip", "model=gpt2", "replace `a` by `b`", "run fast"):
        with pytest.raises(ValueError):
            parse_marker(bad)
    doc = tmp_path / "x.md"
    doc.write_text("<!-- docs-test: model=tiny-llama -->\n\ntext\n\n```python\nx = 1\n```\n")
    assert stray_markers(doc) == [1]  # prose between marker and block: the marker applies to nothing
    block = Block(doc, 5, "python", 'load("smollm2-135m", max_steps=100)\n', Marker(model="tiny-llama"))
    assert substituted(block, "/m") == 'load("/m", max_steps=100)\n'
    with pytest.raises(AssertionError, match="does not contain"):
        substituted(Block(doc, 5, "python", "x = 1\n", Marker(replacements=[("y", "z")])), None)
    with pytest.raises(AssertionError, match="names none"):
        substituted(Block(doc, 5, "python", "x = 1\n", Marker(model="tiny-llama")), "/m")
