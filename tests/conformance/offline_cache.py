"""Download, once, everything the test suite would otherwise fetch from the package index (``make setup`` runs this).

Into ``.cache/test-downloads/`` (git-ignored) under the repository root:

* ``peft-sdist/peft-<installed version>.tar.gz`` — peft's source distribution, whose ``tests/testing_common.py``
  (``PeftCommonTester``) the conformance tests run against SPARSE_LORA and SPP (``peft_harness.py``);
* ``oldest-peft/*.whl`` — the oldest supported peft and the transformers / huggingface_hub / tokenizers it runs with
  (``OLDEST_STACK`` in ``tests/tuners/adapter_testlib.py``), installed with ``pip --no-index`` from this folder by
  the registration round-trip test.

``make test`` then runs pip with ``PIP_NO_INDEX=1`` and only these folders as ``PIP_FIND_LINKS``: the test run itself
makes no network request. ``MANIFEST.txt`` lists what was downloaded.

    python tests/conformance/offline_cache.py [--dest .cache/test-downloads]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".cache" / "test-downloads"


def oldest_stack() -> tuple[str, ...]:
    sys.path.insert(0, str(ROOT / "tests" / "tuners"))
    try:
        from adapter_testlib import OLDEST_STACK
    finally:
        sys.path.pop(0)
    return tuple(OLDEST_STACK)


def _pip_download(dest: Path, *args: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise SystemExit(f"offline_cache: `{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    import peft

    dest = args.dest.resolve()
    sdist = dest / "peft-sdist"
    if not (sdist / f"peft-{peft.__version__}.tar.gz").exists():
        _pip_download(sdist, "--no-binary", ":all:", f"peft=={peft.__version__}")
    stack = oldest_stack()
    _pip_download(dest / "oldest-peft", "--only-binary", ":all:", *stack)
    lines = [f"# downloaded by tests/conformance/offline_cache.py for peft {peft.__version__}; oldest stack {stack}"]
    for path in sorted(p for p in dest.rglob("*") if p.is_file() and p.name not in ("MANIFEST.txt", ".complete")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{path.relative_to(dest)}  {path.stat().st_size}  sha256:{digest}")
    (dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    (dest / ".complete").write_text("ok\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
