"""Atomic file and folder writes: the one home for "an interrupted run never leaves a half-written output".

A leaf module (standard library only). Files: written to a temp sibling, fsynced, renamed over the target.
Folders: :func:`atomic_dir` yields a temp sibling to fill, then swaps it in so that ``out`` is at every moment
either the complete old output or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_output_dir"]


FAULT_ENV = "PRUNE_PEFT_TEST_FAULT"


def _fault(phase: str) -> None:
    """Tests only: SIGKILL this process at a named write phase when ``$PRUNE_PEFT_TEST_FAULT`` names it.

    Phases: ``file-written`` (temp file complete, not renamed), ``dir-filled`` (temp folder filled, not swapped),
    ``dir-old-aside`` (old output renamed aside, new not in), ``dir-new-in`` (new in, old not yet deleted).
    """
    if os.environ.get(FAULT_ENV) == phase:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``), else by a set/restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp sibling, fsync, rename); creates missing parent folders.

    The temp sibling is ``.NAME.tmp-PID-XXXX.tmp``; those of dead processes (a killed write) are removed here, on
    the next write to the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the user's usual permissions
        _fault("file-written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON atomically; values JSON cannot encode are written with ``str``."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False, name: str = "out") -> Path:
    """Validate an output folder before any work starts; returns it as a ``Path``.

    ``name`` is how the caller's user spells the argument (``"out"``, ``"--out"``) for the error message.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name}={str(out)!r} exists and is not a folder; pass a folder path")
    _check_writable(out.parent, out, name)
    if out.exists() and any(out.iterdir()) and not overwrite:
        fix = "--overwrite" if name.startswith("--") else "overwrite=True"
        raise ValueError(f"{name}={str(out)!r} exists and is not empty; pass {fix} to replace it, or another {name}")
    return out


def _check_writable(parent: Path, out: Path, name: str) -> None:
    """The folder the output is created in must accept a new entry (probed by creating one: root ignores modes)."""
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}={str(out)!r} cannot be created: {str(probe)!r} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ValueError(
            f"{name}={str(out)!r} is not writable ({exc.strerror} in {str(probe)!r}); pass a folder you can write to"
        ) from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or the OS cannot tell: keep its files
    return True


def _sibling_pid(path: Path, prefix: str) -> int | None:
    """The pid encoded in ``<prefix><pid>-<random>``, or None for names we did not create."""
    pid = path.name[len(prefix) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _clean_stale_files(path: Path) -> None:
    """Remove the temp files of ``path`` left by writes whose process died (pid encoded in the name)."""
    prefix = f".{path.name}.tmp-"
    for sibling in path.parent.glob(f"{_glob_escape(prefix)}*.tmp"):
        pid = _sibling_pid(sibling, prefix)
        if pid is not None and not _pid_alive(pid) and sibling.is_file():
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()


def _clean_stale(out: Path) -> None:
    """Remove temp/old siblings of ``out`` left by dead runs; an old output orphaned mid-swap is restored."""
    for kind in ("old", "tmp"):  # restore first, so a dead run's complete old output is never deleted
        prefix = f".{out.name}.{kind}-"
        for sibling in sorted(out.parent.glob(f"{_glob_escape(prefix)}*")):
            pid = _sibling_pid(sibling, prefix)
            if pid is None or _pid_alive(pid):
                continue
            if kind == "old" and not out.exists():
                os.replace(sibling, out)  # the run died between "rename old aside" and "rename new in"
            else:
                shutil.rmtree(sibling, ignore_errors=True)


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters in a literal name."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False, name: str = "out") -> Iterator[Path]:
    """Yield a temp sibling folder (``.NAME.tmp-PID-XXXX``) to fill; on success it replaces ``out``.

    On success the files are fsynced, the folder gets the user's umask, and it is swapped in: an existing ``out``
    is renamed aside (``.NAME.old-PID-XXXX``), the new folder renamed in, then the old one deleted, so there is
    never a moment without a complete output. On an exception the temp folder is removed and ``out`` untouched.
    Siblings left by dead runs are cleaned here. Raises ``ValueError`` (naming ``name``) if ``out`` exists and
    is not empty while ``overwrite`` is False.

    >>> with atomic_dir("runs/pruned", overwrite=True) as tmp:
    ...     model.save_pretrained(tmp)
    """
    out = check_output_dir(out, overwrite=overwrite, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    out = check_output_dir(out, overwrite=overwrite, name=name)  # a restored old output counts as existing
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{pid}-", dir=out.parent))
    try:
        yield tmp
        _fault("dir-filled")
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{pid}-", dir=out.parent))
            os.replace(out, old)  # an empty placeholder dir is replaced by the old output
            _fault("dir-old-aside")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _fsync_dir(out.parent)
            _fault("dir-new-in")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
            _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
