"""Imports cost nothing that is not used: `import prune_peft` and `prune-peft --help` load no trl / lm_eval, and
no bitsandbytes / triton beyond what `import peft` itself loads.

Why bitsandbytes and triton cannot be absent (peft 0.21, transformers 5): ``import prune_peft`` must import peft to
register its adapter types, and ``peft/__init__.py`` imports ``peft/helpers.py``, whose line 28 is
``import bitsandbytes as bnb`` (in a try block, so bitsandbytes loads whenever it is installed and prints its
"Failed to load CPU gemm_4bit_forward" line on CPU); peft's ``utils/constants.py`` imports
``transformers.masking_utils``, whose line 19 imports ``torch._dynamo``, which imports triton when installed. The
console script ``prune_peft.cli:main`` runs ``prune_peft/__init__.py`` first, so ``prune-peft --help`` inherits both.
The test pins that prune_peft adds nothing heavy on top of peft.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("bitsandbytes", "triton", "trl", "lm_eval", "vllm")
NEVER = ("trl", "lm_eval", "vllm")


def _heavy_after(code: str) -> set[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def peft_baseline() -> set[str]:
    return _heavy_after("import peft")


CASES = {
    "import prune_peft": "import prune_peft",
    "prune-peft --help": "from prune_peft.cli import main\nassert main(['--help']) == 0",
    "prune-peft prune --help": (
        "from prune_peft.cli import main\ntry:\n    main(['prune', '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_heavy_import_beyond_peft(case, peft_baseline):
    loaded = _heavy_after(CASES[case])
    assert not loaded & set(NEVER), f"{case} imports {sorted(loaded & set(NEVER))}"
    assert loaded <= peft_baseline, f"{case} imports {sorted(loaded - peft_baseline)} that `import peft` does not"


def test_finetune_help_imports_trl_only_because_it_lists_sftconfig():
    loaded = _heavy_after(
        "from prune_peft.cli import main\ntry:\n    main(['finetune', '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0"
    )
    assert "trl" in loaded and "lm_eval" not in loaded and "vllm" not in loaded
