"""prune_peft._io.atomic_dir: built aside, swapped in with no moment without a complete output, cleaned up."""

import os
import stat
import subprocess
import sys

import pytest

from prune_peft import _io
from prune_peft._io import atomic_dir, atomic_write_text, check_output_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_output_appears_complete_with_the_users_umask(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "x.txt").write_text("1")
        assert not out.exists()
    assert (out / "x.txt").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_io._umask()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_existing_output_needs_overwrite_and_is_only_swapped_on_success(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError, match=r"out='.*out' exists and is not empty; pass overwrite=True"):
        with atomic_dir(out):
            pass
    with pytest.raises(ValueError, match=r"--out='.*' exists and is not empty; pass --overwrite"):
        check_output_dir(out, name="--out")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # untouched, temp removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    renames = []
    real_replace = os.replace

    def watching_replace(src, dst):  # the order of the swap: old aside, new in
        renames.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(os, "replace", watching_replace)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [d for _, d in renames][-1] == "out" and renames[0][0] == "out" and ".out.old-" in renames[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is deleted afterwards


def test_leftovers_of_dead_runs_are_cleaned_and_an_orphaned_old_output_restored(tmp_path):
    pid = dead_pid()
    out = tmp_path / "out"
    # a run died between "rename old aside" and "rename new in": only the old output and its temp remain
    old = tmp_path / f".out.old-{pid}-abc"
    old.mkdir()
    (old / "kept.txt").write_text("k")
    (tmp_path / f".out.tmp-{pid}-def").mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a live run's temp folder is left alone
    live.mkdir()
    with pytest.raises(ValueError, match="exists and is not empty"):  # the restored output counts
        with atomic_dir(out):
            pass
    assert (out / "kept.txt").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"out='.*f' exists and is not a folder"):
        check_output_dir(tmp_path / "f", overwrite=True)


def test_atomic_write_text_replaces_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "héllo")
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and sorted(os.listdir(path.parent)) == ["a.txt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_io._umask()
