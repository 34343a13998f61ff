"""What every benchmark shares: the results stamp, paired-ratio statistics, one way of measuring memory, one writer.

Every ``benchmarks/*.py`` script writes its JSON through :func:`write_results`, which adds a ``stamp``: git commit
and dirty flag, library versions, threads, CPU model, the 1-minute load average at start and end, and ``loaded``
when other load competed for the cores. Quick runs (``make bench-quick``) go to ``results/quick/`` and so never
replace the published files that ``benchmarks/report.py`` turns into the README and docs tables.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"

LOADED_RULE = (
    "loaded = the 1-minute load from other processes (at start: the load average; at end: the load average minus "
    "this run's threads) exceeded the cores this run left free (cpu_count - threads) by more than 0.5"
)

# glibc: blocks >= 64 KiB come from mmap and go back to the OS when freed, one arena, so the process's peak RSS
# tracks its peak of live memory instead of the high-water mark of the allocator's arenas.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
MEMORY_METHOD = (
    "Each measured configuration runs in its own fresh process with glibc's mmap threshold pinned to 64 KiB and one "
    "arena (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_ARENA_MAX=1), so freed tensors leave the process and the peak RSS "
    "(VmHWM, the high-water mark of the process's own memory map) tracks peak live memory. baseline_rss_mb = RSS once the model is loaded and paged in; "
    "extra_mb = peak_rss_mb - baseline_rss_mb, the memory the measured work added on top of the loaded model. "
    "Each ratio names its numerator and denominator next to it. No time ratio comes from these processes (page "
    "faults make them slower); oneshot's absolute prune time does, and its JSON says so."
)


# ------------------------------------------------------------------------------------------------------ the stamp


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "prune_peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def is_loaded(load_start: float, load_end: float, threads: int, cpu_count: int) -> bool:
    """See LOADED_RULE: True when other processes competed for the cores this run used."""
    others = max(load_start, load_end - threads)
    return others > max(cpu_count - threads, 0) + 0.5


def start_stamp(threads: int, quick: bool = False) -> dict:
    """Call at the start of a run, before any measured work: commit, versions, machine, load at start."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "HEAD")
    if os.environ.get("PRUNE_PEFT_GIT_COMMIT"):
        # a copy of the tree run elsewhere (the GPU machine), whose .git may be missing or stale: the caller of
        # benchmarks/gpu_check.sh names the commit it sent
        commit = os.environ["PRUNE_PEFT_GIT_COMMIT"]
        status = os.environ.get("PRUNE_PEFT_GIT_DIRTY")
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "versions": _versions(),
        "threads": int(threads),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "argv": sys.argv[1:],
        "quick": bool(quick),
        "load_1min_start": os.getloadavg()[0],
    }


def finish_stamp(stamp: dict) -> dict:
    """Load at the end and the ``loaded`` flag."""
    end = os.getloadavg()[0]
    loaded = is_loaded(stamp["load_1min_start"], end, stamp["threads"], stamp["cpu_count"] or 1)
    return {**stamp, "load_1min_end": end, "loaded": loaded, "loaded_rule": LOADED_RULE}


def results_path(name: str, quick: bool, out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out)
    return (QUICK_RESULTS if quick else RESULTS) / f"{name}.json"


def write_results(name: str, payload: dict, stamp: dict, quick: bool = False, out: str | Path | None = None) -> Path:
    """Atomically write ``payload`` + the finished stamp to results/<name>.json (results/quick/ for quick runs)."""
    path = results_path(name, quick, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "stamp": finish_stamp(stamp), **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {path}", flush=True)
    return path


# ------------------------------------------------------------------------------------------------- paired ratios


def paired(ratios: list[float], numerator: str, denominator: str) -> dict:
    """Median and spread of per-pair ratios (each pair measured back to back, in alternating order)."""
    if not ratios:
        raise ValueError("paired: ratios must be a non-empty list of per-pair ratios")
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "n": len(ratios),
        "pairs": list(ratios),
        "ratio": f"{numerator} / {denominator}",
    }


# -------------------------------------------------------------------------------------------------------- memory


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory map so far (MiB): ``VmHWM`` from /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark into a child across fork + exec, so a
    memory worker started by a parent that had grown (interleaved timing in the parent) reported the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset :func:`peak_rss_mb` (VmHWM) to the current RSS, to measure the peak of one phase
    (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def memory_record(baseline_mb: float) -> dict:
    """In a memory worker, after the measured work: peak, baseline and the extra memory the work added."""
    peak = peak_rss_mb()
    return {"peak_rss_mb": peak, "baseline_rss_mb": baseline_mb, "extra_mb": peak - baseline_mb}


def run_memory_worker(argv: list[str], threads: int) -> dict:
    """Run ``python <argv>`` in a fresh process under MEMORY_ENV; its last stdout line is the JSON result."""
    env = {**os.environ, **MEMORY_ENV, "OMP_NUM_THREADS": str(threads)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"memory worker {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
