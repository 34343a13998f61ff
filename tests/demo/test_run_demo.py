"""run_demo's driver: stage selection, bad input, and the report rewritten after every stage (fast, stages stubbed)."""

import json

import pytest

import prune_peft.demo as demo


def test_report_is_written_after_every_stage_and_selection_is_honoured(tmp_path, monkeypatch):
    seen = []

    def stage(name):
        def run(ctx):
            if name != "load":  # the report on disk already holds every earlier stage
                assert set(json.loads((ctx.out / "report.json").read_text())) == set(seen)
            seen.append(name)
            return {"value": len(seen)}

        return run

    monkeypatch.setattr(demo, "STAGES", [(n, stage(n)) for n in ("load", "a", "b", "c")])
    report = demo.run_demo(tmp_path / "out", quick=True, stages=["c", "a"])
    assert seen == ["load", "a", "c"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["c"]["value"] == 3 and "b" not in on_disk and on_disk["total_seconds"] >= 0
    assert on_disk["a"]["stage_seconds"] >= 0 and report["c"] == on_disk["c"]


def test_unknown_stage_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"stages must be a list of stage names from \['load'.*got \['nope'\]"):
        demo.run_demo(tmp_path / "out", stages=["nope"])
    with pytest.raises(ValueError, match="stages must be a list"):
        demo.run_demo(tmp_path / "out", stages="sparse_lora")
    assert not (tmp_path / "out").exists()


def test_demo_does_not_live_in_tuners_and_does_not_import_the_cli():
    import ast
    from pathlib import Path

    root = Path(demo.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("cli", "prune_peft.cli"), path
    tuners = root.parent / "tuners"
    assert not list(tuners.rglob("*demo*.py"))
