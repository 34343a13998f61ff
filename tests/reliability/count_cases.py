"""Count the reliability campaign (issue #13): bad-input and fault cases, and how many pass.

    python tests/reliability/count_cases.py            # collect only: cases per kind and per file
    python tests/reliability/count_cases.py --run      # run them: tried / rejected cleanly (bad inputs),
                                                       # tried / survived (faults), plus controls and stock limits
    python tests/reliability/count_cases.py --run --json out.json

One case is one collected test item (one parameter set); the kind of each comes from
``reliability_testlib.case_kind``. A bad-input case passes only when the error came, named what it should, came
before any work and left nothing changed; a fault case passes only when nothing on disk was lost or mixed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reliability_testlib import case_kind  # noqa: E402


class _Recorder:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.outcome: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        self.items = [item.nodeid for item in items]

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed or report.skipped or report.when == "call":
            if self.outcome.get(report.nodeid) not in ("failed",):
                self.outcome[report.nodeid] = report.outcome


def main(argv: list[str] | None = None) -> int:
    import pytest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the cases (default: collect only)")
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("-k", help="pytest -k expression (a subset)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rec = _Recorder()
    args = [str(HERE), "-q", "-p", "no:cacheprovider"] + ([] if opts.run else ["--collect-only"])
    args += ["-k", opts.k] if opts.k else []
    rc = pytest.main(args, plugins=[rec])
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid in rec.items:
        kind = case_kind(nodeid)
        kinds[kind]["tried"] += 1
        files[nodeid.split("::")[0].rsplit("/", 1)[-1]][kind] += 1
        if opts.run:
            kinds[kind][rec.outcome.get(nodeid, "not run")] += 1
    result = {"kinds": {k: dict(v) for k, v in sorted(kinds.items())}, "files": {k: dict(v) for k, v in files.items()}}
    print()
    for name, counts in sorted(files.items()):
        print(f"{name:32s} " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    words = {"bad-input": "rejected cleanly", "fault": "survived (nothing lost)"}
    for kind, counts in sorted(kinds.items()):
        line = f"{kind}: {counts['tried']} tried"
        if opts.run:
            ok = words.get(kind, "passed")
            line += f", {counts['passed']} {ok}, {counts['failed']} failed, {counts['skipped']} skipped"
        print(line)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return int(rc) if opts.run else 0


if __name__ == "__main__":
    sys.exit(main())
