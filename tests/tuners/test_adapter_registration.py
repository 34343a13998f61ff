"""Registration with peft: idempotent, and save → fresh process → load on the oldest and the newest peft."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import peft
import pytest
from adapter_testlib import OLDEST_PEFT, oldest_peft_env
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import prune_peft
from prune_peft.tuners import SparseLoraConfig, SPPConfig, ensure_peft_type, register_adapter_type
from prune_peft.tuners.sparse_lora import SparseLoraModel
from prune_peft.tuners.spp import SPPModel

SCRIPT = Path(__file__).with_name("roundtrip_script.py")


def test_types_are_registered_once_and_behave_like_enum_members():
    for name, config_cls, model_cls in (
        ("SPARSE_LORA", SparseLoraConfig, SparseLoraModel),
        ("SPP", SPPConfig, SPPModel),
    ):
        member = PeftType[name]
        assert PeftType(name) is member and member in list(PeftType) and member.value == name
        assert pickle.loads(pickle.dumps(member)) is member and json.dumps(member) == f'"{name}"'
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "lora_"
        # idempotent: a second registration (re-import, reload) changes nothing
        assert ensure_peft_type(name) is member
        register_adapter_type(name.lower(), config_cls, model_cls)
        assert list(PeftType.__members__).count(name) == 1
    assert prune_peft.SparseLoraConfig is SparseLoraConfig and prune_peft.SPPConfig is SPPConfig
    config = SparseLoraConfig(target_modules="all-linear")
    assert config.peft_type == PeftType.SPARSE_LORA and isinstance(config, peft.LoraConfig)


def test_registering_someone_elses_type_under_our_name_is_refused():
    class Other(peft.LoraConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_adapter_type("spp", Other, SPPModel)


def _start(mode, *dirs, pythonpath=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(SCRIPT), mode, *map(str, dirs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(*procs):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_fresh_process_roundtrips_on_the_oldest_and_newest_peft(tmp_path):
    """Saved by one process, loaded by another, on peft 0.17.1 and the installed peft, in all four combinations.

    Each loading process first checks that, without ``import prune_peft``, peft refuses the adapter type.
    """
    try:
        env = oldest_peft_env()
    except RuntimeError as exc:  # no PyPI: say so, fail when CI demands it
        if os.environ.get("PRUNE_PEFT_REQUIRE_HARNESS"):
            raise
        pytest.skip(str(exc))
    old, new = tmp_path / "old", tmp_path / "new"
    saved_old, saved_new = _wait(_start("save", old, pythonpath=env), _start("save", new))
    assert saved_old["peft"] == OLDEST_PEFT and saved_new["peft"] == peft.__version__
    loaded_old, loaded_new = _wait(_start("load", old, new, pythonpath=env), _start("load", new, old))
    assert loaded_old["peft"] == OLDEST_PEFT and loaded_new["peft"] == peft.__version__
    for loaded in (loaded_old, loaded_new):
        refused, *checked = loaded["checked"]
        assert "KeyError" in refused and "SPARSE_LORA" in refused
        assert sorted(checked) == ["new/sparse_lora", "new/spp", "old/sparse_lora", "old/spp"]


def test_registration_is_one_visible_call_in_prune_peft_init():
    """Registration is ``register_adapter_types()`` at the top level of prune_peft/__init__.py, not a side effect of
    importing a tuner folder; every registered type is in ``ADAPTER_TYPES``."""
    import ast

    from prune_peft.tuners import ADAPTER_TYPES
    from prune_peft.tuners.loraprune import LoRAPruneConfig, LoRAPruneModel

    root = Path(prune_peft.__file__).parent

    def calls(path, top_level_only=False):
        tree = ast.parse(path.read_text())
        nodes = [n.value for n in tree.body if isinstance(n, ast.Expr)] if top_level_only else ast.walk(tree)
        return {n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

    assert "register_adapter_types" in calls(root / "__init__.py", top_level_only=True)
    folders = sorted((root / "tuners").glob("*/__init__.py"))
    assert len(folders) == 3
    for init in folders:
        assert not calls(init) & {"register_adapter_type", "register_peft_method"}, init
    assert [n for n, *_ in ADAPTER_TYPES] == ["sparse_lora", "spp", "loraprune"]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORAPRUNE] is LoRAPruneConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORAPRUNE] is LoRAPruneModel
