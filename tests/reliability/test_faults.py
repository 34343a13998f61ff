"""Injected faults: a SIGKILL at each write phase, read-only targets, truncated/tampered side files.

The kill points are ``prune_peft._io`` phases selected by ``$PRUNE_PEFT_TEST_FAULT`` (test-only): after every
kill the target holds the complete old output or the complete new one (after the next run's cleanup of dead
siblings), never a mix, and no hidden temp folder survives that cleanup.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prune_peft._io import FAULT_ENV, _clean_stale, atomic_dir

PHASES = ["dir-filled", "dir-old-aside", "dir-new-in"]
ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


def run_killed(code: str, phase: str) -> None:
    proc = _python(code, **{FAULT_ENV: phase})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def settle(out: Path) -> None:
    """What the next run does first: restore an orphaned old output, delete dead temp/old siblings."""
    _clean_stale(out)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "hidden leftovers"


def run_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter with no fault injected; it must succeed."""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def check_old_or_new(out: Path, old: dict, new_check) -> str:
    settle(out)
    now = tree(out)
    if now == old:
        return "old"
    new_check(out)
    return "new"


def overwrite_killed(out: Path, old_files: dict[str, str], code: str, phase: str, is_new) -> None:
    """``code`` overwrites ``out`` (pre-filled with ``old_files``) and is SIGKILLed at ``phase``: after the next run's
    cleanup ``out`` is the complete old output (killed before the swap) or passes ``is_new`` (killed after it)."""
    out.mkdir()
    for name, text in old_files.items():
        (out / name).write_text(text)
    old = tree(out)
    run_killed(code, phase)
    state = check_old_or_new(out, old, is_new)
    assert state == ("new" if phase == "dir-new-in" else "old")


ATOMIC_DIR = """
from prune_peft._io import atomic_dir
with atomic_dir({out!r}, overwrite=True) as tmp:
    (tmp / "a.txt").write_text("new-a"); (tmp / "c.txt").write_text("new-c")
"""


def test_atomic_dir_first_write_killed(tmp_path):
    out = tmp_path / "fresh"
    run_killed(
        f"""
        from prune_peft._io import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "half").write_text("x")
        """,
        "dir-filled",
    )
    settle(out)
    assert not out.exists()  # nothing half-written under the real name
    with atomic_dir(out) as tmp:  # the rerun is not refused by leftovers
        (tmp / "ok").write_text("y")
    assert tree(out) == {"ok": b"y"}


def test_atomic_file_killed_keeps_old(tmp_path):
    f = tmp_path / "report.json"
    f.write_text('{"old": 1}\n')
    run_killed(
        f"from prune_peft._io import atomic_write_json; atomic_write_json({str(f)!r}, {{'new': 2}})", "file-written"
    )
    assert f.read_text() == '{"old": 1}\n'


EXPORT = """
import torch, prune_peft
from peft import get_peft_model
from prune_peft.hub import export
from prune_peft.testing import tiny_causal_lm
from prune_peft.sparsity import nm_mask
m = tiny_causal_lm(num_hidden_layers=1)
for n, l in m.named_modules():
    if isinstance(l, torch.nn.Linear) and "lm_head" not in n:
        l.weight.data.mul_(nm_mask(l.weight.data.abs(), 2, 4))
pm = get_peft_model(m, prune_peft.SparseLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
export(pm, {out!r}, overwrite=True)
"""


CLI_PRUNE = """
import sys
from prune_peft.cli import main
sys.exit(main(["prune", "--model", {model!r}, "--method", "magnitude", "--sparsity", "0.5", "--out", {out!r},
               "--overwrite", "--eval-windows", "0"]))
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from prune_peft.testing import byte_tokenizer, tiny_causal_lm

    d = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm(num_hidden_layers=1).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


SAVE_COMPACTED = """
from prune_peft import save_compacted
from prune_peft.testing import tiny_causal_lm
save_compacted(tiny_causal_lm(num_hidden_layers=1), {out!r}, overwrite=True)
"""


def _new_atomic_dir(o: Path) -> None:
    assert tree(o) == {"a.txt": b"new-a", "c.txt": b"new-c"}


def _new_export(o: Path) -> None:
    assert (o / "config.json").exists() and any(p.suffix == ".safetensors" for p in o.iterdir())


def _new_cli_prune(o: Path) -> None:
    assert (o / "prune_report.json").exists() and (o / "config.json").exists()


def _new_save_compacted(o: Path) -> None:
    assert (o / "config.json").exists() and (o / "model.safetensors").exists()


# writer -> (output folder, its old files, the overwriting script, the check of a complete new output)
OVERWRITES = {
    "atomic_dir": ("out", {"a.txt": "old-a", "b.txt": "old-b"}, ATOMIC_DIR, _new_atomic_dir),
    "export": ("export", {"config.json": '{"old": true}'}, EXPORT, _new_export),
    "cli_prune": ("pruned", {"prune_report.json": '{"old": true}'}, CLI_PRUNE, _new_cli_prune),
    "save_compacted": ("compacted", {"config.json": '{"old": true}'}, SAVE_COMPACTED, _new_save_compacted),
}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("writer", list(OVERWRITES))
def test_overwrite_killed_leaves_old_or_new(request, tmp_path, writer, phase):
    folder, old_files, script, is_new = OVERWRITES[writer]
    out = tmp_path / folder
    model = str(request.getfixturevalue("tiny_folder")) if writer == "cli_prune" else None  # only the CLI loads one
    overwrite_killed(out, old_files, script.format(out=str(out), model=model), phase, is_new)


def test_export_read_only_target_refused_before_work(fresh):
    from peft import get_peft_model
    from reliability_testlib import assert_unchanged, snapshot

    import prune_peft
    from prune_peft.hub import export

    pm = get_peft_model(fresh(), prune_peft.SparseLoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"not writable|cannot be created"):
        export(pm, "/proc/prune-peft-export", overwrite=True)
    assert_unchanged(before, pm)  # not merged, not unloaded


def test_cli_read_only_out_exit_2(tiny_folder, capsys):
    from prune_peft.cli import main

    rc = main(["prune", "--model", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.5", "--out", "/proc/x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err


class _Args:
    def __init__(self, out):
        self.output_dir, self.resume_from_checkpoint, self.should_save = str(out), None, True


class _State:
    def __init__(self, step, cb_state=None):
        self.global_step = step
        self.stateful_callbacks = {"PruneCallback": cb_state} if cb_state else {}


class _Driver:
    """A PruneCallback driver with one tensor (``imp``) in the side file; ``loaded`` is set only by a restore."""

    key = "d"

    def tensors(self):
        import torch

        return {"imp": torch.arange(6.0)}

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass

    def load_tensors(self, t):
        self.loaded = t


@pytest.mark.parametrize("damage", ["tampered", "truncated", "missing"])
def test_resume_side_file_damage_refused(tmp_path, damage):
    """A checkpoint whose side file is damaged or missing is refused at on_train_begin, before any step."""
    from safetensors.torch import load_file, save_file

    from prune_peft.callbacks.prune import SIDE_FILE, PruneCallback

    cb = PruneCallback()
    cb.drivers = [_Driver()]
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    cb._args, cb._state = _Args(tmp_path), _State(3)
    saved = cb.state()
    side = ckpt / SIDE_FILE
    assert side.exists() and "side_sha256" in saved["attributes"]["saved"]  # written before trainer_state.json
    if damage == "tampered":
        t = load_file(side)
        t["d/imp"][0] = 99.0
        save_file(t, side)
    elif damage == "truncated":
        side.write_bytes(side.read_bytes()[:20])
    else:
        side.unlink()
    cb2 = PruneCallback()
    cb2.drivers = [_Driver()]
    with pytest.raises((ValueError, FileNotFoundError), match=SIDE_FILE):
        cb2._restore(_Args(tmp_path), _State(3, saved))
    assert not hasattr(cb2.drivers[0], "loaded")


def test_save_compacted_refuses_a_non_empty_folder_before_work(tmp_path):
    from prune_peft import save_compacted
    from prune_peft.testing import tiny_causal_lm

    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match=r"path=.*not empty.*overwrite=True"):
        save_compacted(tiny_causal_lm(num_hidden_layers=1), tmp_path)
    assert tree(tmp_path) == {"keep.txt": b"old"}


WRITERS = {
    "json": "atomic_write_json({f!r}, {{'new': 2}})",
    "text": "atomic_write_text({f!r}, 'new')",
    "bytes": "atomic_write_bytes({f!r}, b'new')",
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_atomic_file_killed_temp_cleaned_on_next_write(tmp_path, writer):
    """A write killed after its temp file is complete keeps the old file; the next write removes the dead temp."""
    from prune_peft._io import atomic_write_text

    f = tmp_path / "out.txt"
    f.write_text("old")
    bystander = tmp_path / ".out.txt.user-notes"  # not our pattern: never touched
    bystander.write_text("keep")
    code = "from prune_peft._io import atomic_write_bytes, atomic_write_json, atomic_write_text\n"
    run_killed(code + WRITERS[writer].format(f=str(f)), "file-written")
    assert f.read_text() == "old"
    dead = [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt.tmp-")]
    assert len(dead) == 1 and dead[0].stat().st_size > 0  # the killed write's complete temp file
    atomic_write_text(f, "next")
    assert f.read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.txt.user-notes", "out.txt"]


def test_atomic_file_live_writer_temp_kept(tmp_path):
    """A temp file whose pid is alive (a concurrent writer, here this process) is not removed."""
    from prune_peft._io import atomic_write_text

    live = tmp_path / f".out.txt.tmp-{os.getpid()}-abcd.tmp"
    live.write_text("in progress")
    atomic_write_text(tmp_path / "out.txt", "x")
    assert live.read_text() == "in progress"


CLI_DISTILL = """
import sys
from prune_peft.cli import main
sys.exit(main(["distill", "--teacher", {model!r}, "--dataset", "arithmetic", "--n", "4", "--template", "math",
               "--max-new-tokens", "2", "--batch-size", "2", "--out", {out!r}, "--cache-dir", {cache!r},
               "--overwrite"]))
"""


def _distill_rows(path: Path) -> list:
    from datasets import load_from_disk

    return load_from_disk(str(path)).to_list()


@pytest.fixture(scope="module")
def distilled_ref(tiny_folder, tmp_path_factory):
    """An uninterrupted run: what every killed-then-rerun distill must end with."""
    d = tmp_path_factory.mktemp("distill-ref")
    run_ok(CLI_DISTILL.format(model=str(tiny_folder), out=str(d / "out"), cache=str(d / "cache")))
    return _distill_rows(d / "out")


@pytest.mark.parametrize("phase", PHASES)
def test_cli_distill_overwrite_killed(tmp_path, tiny_folder, distilled_ref, phase):
    """SIGKILL in distill's first atomic write (a cache shard, or the --out swap when the shard has no old copy):
    --out is the old or the complete new dataset, and the rerun resumes from the cache to the uninterrupted result."""
    out, cache = tmp_path / "distilled", tmp_path / "cache"
    code = CLI_DISTILL.format(model=str(tiny_folder), out=str(out), cache=str(cache))

    def is_new(o):
        assert _distill_rows(o) == distilled_ref

    overwrite_killed(out, {"distill_stats.json": '{"old": true}'}, code, phase, is_new)
    run_ok(code)
    assert _distill_rows(out) == distilled_ref
    shards = cache / "shards"
    assert not [p.name for p in shards.iterdir() if p.name.startswith(".")], "temp shards of the killed run left"


RESUME_SIDE_FILE = """
import torch
from prune_peft.callbacks.prune import PruneCallback


class Driver:
    key = "d"

    def tensors(self):
        return {{"imp": torch.arange(6.0)}}

    def state_dict(self):
        return {{}}


class Args:
    output_dir, resume_from_checkpoint, should_save = {out!r}, None, True


class State:
    global_step = 3


cb = PruneCallback()
cb.drivers = [Driver()]
cb._args, cb._state = Args(), State()
cb.state()
"""


def test_resume_side_file_write_killed(tmp_path):
    """SIGKILL while the side file is written (before trainer_state.json would make the checkpoint resumable): no
    partial side file; the temp file is cleaned by the next write; resuming that checkpoint is refused, naming it."""

    from prune_peft.callbacks.prune import SIDE_FILE, PruneCallback

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    run_killed(RESUME_SIDE_FILE.format(out=str(tmp_path)), "file-written")
    assert not (ckpt / SIDE_FILE).exists()
    leftovers = [p.name for p in ckpt.iterdir()]
    assert leftovers and all(n.startswith(f".{SIDE_FILE}.") for n in leftovers)  # the dead writer's temp only
    claimed = {"drivers": {"d": {}}, "side_file": True, "side_sha256": "0" * 64}
    cb = PruneCallback()
    cb.drivers = [_Driver()]
    with pytest.raises(FileNotFoundError, match=SIDE_FILE):
        cb._restore(_Args(tmp_path), _State(3, {"attributes": {"saved": claimed}}))
    assert not hasattr(cb.drivers[0], "loaded")
    cb._args, cb._state = _Args(tmp_path), _State(3)
    cb.state()  # the next save of that step: complete file, the dead temp gone
    assert [p.name for p in ckpt.iterdir()] == [SIDE_FILE]
