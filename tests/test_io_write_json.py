"""atomic_write_json (was ``prune_peft.cli.write_json``): a failed write leaves the old file and no temp file."""

import json

import pytest

from prune_peft._io import atomic_write_json


def test_write_json_atomic(tmp_path):
    class Boom:
        def __str__(self):
            raise RuntimeError("cannot serialize")

    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        atomic_write_json(path, {"b": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind
