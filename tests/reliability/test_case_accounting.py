"""The case counter (count_cases.py) classifies by test name: every name it lists must still exist."""

import ast
from pathlib import Path

from reliability_testlib import CONTROLS, STOCK_LIMITS, case_kind


def test_case_accounting_names_exist():
    here = Path(__file__).parent
    names = {
        node.name
        for f in here.glob("test_*.py")
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert (CONTROLS | STOCK_LIMITS | {"test_case_accounting_names_exist"}) <= names
    assert case_kind("tests/reliability/test_faults.py::test_x[a]") == "fault"
    assert case_kind("tests/reliability/test_load_paths.py::test_x[a]") == "bad-input"
    assert case_kind("tests/reliability/test_bad_inputs.py::test_prune_report_roundtrip_kept") == "control"
