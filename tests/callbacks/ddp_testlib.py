"""Launch a worker script as 2 CPU processes on gloo with torchrun (what users run with `torchrun`/`accelerate`).

Shared by the 2-rank DDP and FSDP2 tests: the launch, reading back what each rank wrote, loading a worker module for
the one-process reference, comparing whole weights, and a 1-process gloo group for checks that need no launch.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker: Path, out_dir: Path, timeout: int = 300) -> None:
    """Run ``worker out_dir`` on 2 ranks; fail with the workers' stderr when the run fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(worker), str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def read_ranks(out_dir: Path, name: str = "rank{rank}.json", world: int = 2) -> list:
    """What each rank wrote to ``out_dir / name`` (``{rank}`` filled in): JSON, or a ``torch.save``d object."""
    paths = [out_dir / name.format(rank=r) for r in range(world)]
    if name.endswith(".json"):
        return [json.loads(p.read_text()) for p in paths]
    return [torch.load(p, weights_only=False) for p in paths]


def two_rank_results(worker: Path, out_dir: Path, timeout: int = 300, name: str = "rank{rank}.json") -> list:
    """Run ``worker`` on 2 ranks (:func:`run_two_ranks`) and return both ranks' results (:func:`read_ranks`)."""
    run_two_ranks(worker, out_dir, timeout=timeout)
    return read_ranks(out_dir, name)


def load_worker(path: Path, name: str) -> ModuleType:
    """Import a worker script by path under its own module name, for the one-process reference in the test's process.

    By path, not through ``sys.path``: tests/callbacks and tests/tuners/loraprune each hold an ``fsdp2_worker.py``.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over tensors of the same names (the names must agree)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(name="one_rank")
def one_rank_fixture(tmp_path):
    """A 1-process gloo group: FSDP2/DTensor layouts can be built (and refused) without a launch.

    A test module imports ``one_rank_fixture`` and its tests ask for ``one_rank``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
