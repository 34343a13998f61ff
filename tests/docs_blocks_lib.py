"""Extract and run the fenced code blocks of README.md and docs/*.md (used by tests/test_docs_blocks.py).

A block runs as a reader would run it: ``python`` blocks are executed in a fresh namespace, ``bash`` blocks run their
``prune-peft ...`` commands through the CLI's ``main`` and their ``python examples/...`` commands with ``runpy`` (in this process, ``sys.argv`` set),
and all blocks of one document share one working directory, in document order (a later block may read what an
earlier one wrote). ``text`` blocks (diagrams, output, synopses) are not code and are not run.

What the test changes is stated in the document itself, in an HTML comment right above the block (invisible on
GitHub, visible in the source)::

    <!-- docs-test: model=tiny-llama -->
    <!-- docs-test: model=tiny-llama; replace `max_steps=100` with `max_steps=2` -->
    <!-- docs-test: file=finetune.yaml -->
    <!-- docs-test: skip (needs a CUDA GPU) -->

- ``model=tiny-llama``: the embedded alias ``smollm2-135m`` and the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``
  are replaced by the folder of a tiny random Llama (``prune_peft.testing``: 8 blocks, hidden 64, byte tokenizer)
  saved once per test session.
- ``replace `OLD` with `NEW```: a plain text substitution (each ``OLD`` must occur in the block, so a marker cannot
  silently stop applying); used to shorten training (``max_steps``) without changing what the reader sees.
- ``file=NAME``: the block (a YAML/JSON config) is written to ``NAME`` in the working directory.
- ``skip (REASON)``: not run; the reason is mandatory (e.g. ``make`` targets, ``pip install``, multi-GPU launches,
  blocks that need the Hub or a GPU).
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_IDS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")
RUN_LANGS = ("python", "bash")
LANGS = (*RUN_LANGS, "text", "yaml", "json")
MODELS = ("tiny-llama",)

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[^\s`]*)\s*$")
_MARKER = re.compile(r"^[ \t]*<!--\s*docs-test:(?P<body>.*?)-->", re.S | re.M)  # a comment opening its own line
_ITEM = re.compile(
    r"\s*(?:(?P<skip>skip\s*\((?P<reason>[^)]*)\))"
    r"|model=(?P<model>[\w.-]+)"
    r"|file=(?P<file>[\w./-]+)"
    r"|replace\s+`(?P<old>[^`]+)`\s+with\s+`(?P<new>[^`]*)`)\s*(?:;|$)"
)


@dataclass
class Marker:
    """The parsed ``<!-- docs-test: ... -->`` comment above a block."""

    raw: str = ""
    skip: str | None = None
    model: str | None = None
    file: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: Marker

    @property
    def where(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc
        return f"{doc}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.marker.skip is None and (self.lang in RUN_LANGS or self.marker.file is not None)


def doc_files() -> list[Path]:
    """README.md and every docs/*.md (new documents are picked up automatically)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_marker(body: str) -> Marker:
    """Parse the body of a marker comment; raises ValueError on anything it does not understand."""
    marker, pos, body = Marker(raw=body.strip()), 0, body.strip()
    while pos < len(body):
        m = _ITEM.match(body, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse docs-test marker item at {body[pos:]!r}")
        if m["skip"]:
            if not m["reason"].strip():
                raise ValueError("a docs-test skip needs a reason: skip (why)")
            marker.skip = m["reason"].strip()
        elif m["model"]:
            if m["model"] not in MODELS:
                raise ValueError(f"docs-test model={m['model']!r}: allowed {MODELS}")
            marker.model = m["model"]
        elif m["file"]:
            marker.file = m["file"]
        else:
            marker.replacements.append((m["old"], m["new"]))
        pos = m.end()
    return marker


def extract(doc: Path) -> list[Block]:
    """Every fenced block of ``doc`` with the marker right above it (blank lines in between allowed)."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, fence = i, m["fence"]
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip()[len(fence) :]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{doc}:{start + 1}: unclosed code fence")
        indent = len(m["indent"])
        text = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[start + 1 : j]) + "\n"
        blocks.append(Block(doc, start + 1, m["lang"], text, _marker_above(lines, start)))
        i = j + 1
    return blocks


def _marker_above(lines: list[str], fence: int) -> Marker:
    k = fence - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    if k < 0 or not lines[k].rstrip().endswith("-->"):
        return Marker()
    end = k
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    comment = "\n".join(lines[k : end + 1])
    m = _MARKER.search(comment)
    return parse_marker(m["body"]) if m else Marker()


def stray_markers(doc: Path) -> list[int]:
    """Lines of docs-test markers that no block follows (a marker that applies to nothing is a mistake)."""
    text = doc.read_text()
    used = {b.line for b in extract(doc)}
    out = []
    for m in _MARKER.finditer(text):
        line = text.count("\n", 0, m.end()) + 1
        rest = text[m.end() :].splitlines()[1:]
        nxt = next((n for n, s in enumerate(rest) if s.strip()), None)
        if nxt is None or (line + 1 + nxt) not in used:
            out.append(line)
    return out


def substituted(block: Block, tiny_model_dir: str | None) -> str:
    """The block's text with the marker's substitutions applied (each must apply)."""
    text = block.text
    for old, new in block.marker.replacements:
        if old not in text:
            raise AssertionError(f"{block.where}: marker says replace {old!r}, which the block does not contain")
        text = text.replace(old, new)
    if block.marker.model is not None:
        if not any(ident in text for ident in TINY_IDS):
            raise AssertionError(f"{block.where}: model={block.marker.model} but the block names none of {TINY_IDS}")
        for ident in TINY_IDS:
            text = text.replace(ident, str(tiny_model_dir))
    return text


def bash_commands(text: str) -> list[list[str]]:
    """Commands of a bash block: comments dropped, backslash continuations joined, one argv per line."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def run_block(block: Block, cwd: Path, tiny_model_dir: str | None) -> None:
    """Run one block in ``cwd``; raises (AssertionError or the block's own exception) when it fails."""
    text = substituted(block, tiny_model_dir)
    if block.marker.file is not None:
        (cwd / block.marker.file).parent.mkdir(parents=True, exist_ok=True)
        (cwd / block.marker.file).write_text(text)
        return
    old = Path.cwd()
    os.chdir(cwd)
    try:
        if block.lang == "python":
            exec(compile(text, block.where, "exec"), {"__name__": "__main__"})
        elif block.lang == "bash":
            for argv in bash_commands(text):
                _run_command(block, argv, cwd)
        else:
            raise AssertionError(f"{block.where}: {block.lang!r} blocks are not run; mark it file=NAME or skip (why)")
    finally:
        os.chdir(old)


def _run_command(block: Block, argv: list[str], cwd: Path) -> None:
    if argv[0] == "prune-peft":
        from prune_peft.cli import main

        rc = main(argv[1:])
        assert rc == 0, f"{block.where}: `{shlex.join(argv)}` exited with {rc}"
    elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("examples/"):
        script = ROOT / argv[1]  # the docs say: run from the repository root
        # in this process, as `python script args` would run it (argv, __main__), without a second interpreter start
        saved = sys.argv
        sys.argv = [str(script), *argv[2:]]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), f"{block.where}: `{shlex.join(argv)}` exited with {exc.code}"
        finally:
            sys.argv = saved
    else:
        raise AssertionError(
            f"{block.where}: `{shlex.join(argv)}`: only `prune-peft ...` and `python examples/...` commands are run; "
            "mark the block `<!-- docs-test: skip (why) -->` if it cannot run in a test"
        )
