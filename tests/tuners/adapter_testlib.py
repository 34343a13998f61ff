"""Helpers shared by the adapter tests (a uniquely named module, so imports never hit another conftest)."""

import torch

from prune_peft.sparsity import nm_mask, unstructured_mask


def prune_linears(model: torch.nn.Module, pattern: str = "2:4", skip=("lm_head",)) -> torch.nn.Module:
    """Magnitude-prune every linear layer in place (2:4, or 50 % unstructured per row)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            w = module.weight.data
            keep = nm_mask(w.abs(), 2, 4) if pattern == "2:4" else unstructured_mask(w.abs(), 0.5)
            w.mul_(keep)
    return model


def zero_sets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{linear name: weight == 0} for the decoder linears (lm_head excluded), names without peft prefixes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from prune_peft.tuners import dense_weight

    out = {}
    for name, module in model.named_modules():
        if "lm_head" in name or ".lora_" in name or name.endswith("base_layer"):
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif not isinstance(module, torch.nn.Linear):
            continue
        out[name.removeprefix("base_model.model.")] = dense_weight(module) == 0
    return out


# ------------------------------------------------------------------------------------ the oldest supported peft

OLDEST_PEFT = "0.17.1"
# peft 0.17 imports transformers.HybridCache (gone in transformers 5), so it runs with the last 4.x transformers
OLDEST_STACK = (f"peft=={OLDEST_PEFT}", "transformers==4.56.2", "huggingface_hub==0.36.0", "tokenizers==0.22.1")


def oldest_peft_env() -> str:
    """A ``pip install --target`` folder with the oldest supported peft (and a transformers it runs with).

    Put first on ``PYTHONPATH`` of a subprocess, it shadows the venv's peft/transformers; everything else (torch,
    safetensors, accelerate, prune_peft itself) comes from the venv. Cached in the git-ignored
    ``tests/conformance/_peft_harness/``; built into a temp folder and renamed, so it is complete or absent.
    """
    import fcntl
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "conformance" / "_peft_harness"
    target = root / f"env-peft-{OLDEST_PEFT}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock-env", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".env-", dir=root))
            try:
                cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), *OLDEST_STACK]
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if result.returncode:
                    raise RuntimeError(f"installing {OLDEST_STACK} failed: {result.stderr[-800:]}")
                (tmp / ".complete").write_text("ok\n")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
