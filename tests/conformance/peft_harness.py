"""Fetch peft's own tuner test harness (``tests/testing_common.py``) for the installed peft version.

The harness is not vendored: ``make setup`` downloads the peft sdist matching ``peft.__version__`` into the
git-ignored ``.cache/test-downloads/peft-sdist/`` (``offline_cache.py``), and at test time ``testing_common.py`` plus
its helper ``testing_utils.py`` are extracted from it into a package ``peft_tests_<version>`` under the git-ignored
``tests/conformance/_peft_harness/``. Without that cache (pytest run outside ``make``) pip is asked for the sdist;
``make test`` forbids pip the index (``PIP_NO_INDEX=1``), so there a missing cache is an error, not a download. ``diffusers`` (imported by the
harness at module level, used only by Stable Diffusion tests) is stubbed.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft

ROOT = Path(__file__).parent / "_peft_harness"
SDIST_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "test-downloads" / "peft-sdist"  # make setup fills it
FILES = ("testing_common.py", "testing_utils.py")


class HarnessUnavailable(RuntimeError):
    pass


def _package_name(version: str) -> str:
    return "peft_tests_" + version.replace(".", "_").replace("-", "_").replace("+", "_")


def _download_sdist(version: str, dest: Path) -> Path:
    cached = SDIST_CACHE / f"peft-{version}.tar.gz"
    if cached.exists():
        return cached
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"peft-{version}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
    cmd += ["-d", str(dest), f"peft=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(dest.glob(f"peft-{version}.tar.gz"))
    if result.returncode or not found:
        raise HarnessUnavailable(
            f"the peft {version} sdist is not in {SDIST_CACHE} (run `make setup`) and pip could not fetch it: "
            f"{result.stderr.strip()[-500:]}"
        )
    return found[0]


def _extract(sdist: Path, version: str, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(sdist) as tar:
            for name in FILES:
                member = tar.getmember(f"peft-{version}/tests/{name}")
                data = tar.extractfile(member).read()
                (tmp / name).write_bytes(data)
        (tmp / "__init__.py").write_text("")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # complete or absent, never half-extracted
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stub_diffusers() -> None:
    if "diffusers" in sys.modules:
        return
    try:
        importlib.import_module("diffusers")
        return
    except ImportError:
        pass
    stub = types.ModuleType("diffusers")

    class StableDiffusionPipeline:  # only used in isinstance checks of SD-specific branches
        pass

    stub.StableDiffusionPipeline = StableDiffusionPipeline
    sys.modules["diffusers"] = stub


def load_testing_common(version: str | None = None):
    """Import (downloading on first use) ``testing_common`` of the given (default: installed) peft version."""
    version = version or peft.__version__
    ROOT.mkdir(parents=True, exist_ok=True)
    package = _package_name(version)
    target = ROOT / package
    with open(ROOT / ".lock", "w") as lock:  # pytest-xdist workers collect concurrently
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not all((target / f).exists() for f in (*FILES, "__init__.py")):
                _extract(_download_sdist(version, ROOT / "downloads"), version, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _stub_diffusers()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"{package}.testing_common")
