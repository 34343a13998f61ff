"""Fresh-process save/load round trip of SPARSE_LORA and SPP adapters (run by test_adapter_registration.py).

    python roundtrip_script.py save DIR          # build, save adapters + expected logits into DIR/<kind>
    python roundtrip_script.py load DIR [DIR...] # fresh process: first check that loading fails without
                                                 # `import prune_peft`, then import it, load, compare, merge

Prints one JSON line: {"peft": version, "checked": [...]}. Runs against whichever peft is first on the path, so the
same script covers the oldest (0.17.x) and the newest supported peft.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

KINDS = ("sparse_lora", "spp")


def pruned_model():
    from adapter_testlib import prune_linears

    from prune_peft.testing import tiny_causal_lm

    return prune_linears(tiny_causal_lm(seed=11, num_hidden_layers=2)).eval()


def inputs():
    return torch.randint(0, 260, (2, 10), generator=torch.Generator().manual_seed(3))


def save(root: Path) -> list[str]:
    import importlib

    import peft
    from peft import get_peft_model

    import prune_peft
    from prune_peft.tuners import SparseLoraConfig, register_adapter_type
    from prune_peft.tuners.sparse_lora import SparseLoraModel

    # registration is idempotent: again by hand, again through the package's call, and after a module reload
    register_adapter_type("sparse_lora", SparseLoraConfig, SparseLoraModel)
    prune_peft.register_adapter_types()
    importlib.reload(importlib.import_module("prune_peft.tuners.spp"))
    prune_peft.register_adapter_types()
    assert list(peft.utils.PeftType.__members__).count("SPARSE_LORA") == 1
    configs = {
        "sparse_lora": prune_peft.SparseLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        "spp": prune_peft.SPPConfig(target_modules="all-linear", init_lora_weights=False),
    }
    for kind in KINDS:
        model = get_peft_model(pruned_model(), configs[kind]).eval()
        model.add_adapter("second", configs[kind])
        with torch.no_grad():
            logits = model(inputs()).logits
        model.save_pretrained(root / kind)
        torch.save({"logits": logits}, root / kind / "expected.pt")
        from safetensors.torch import load_file

        keys = load_file(root / kind / "adapter_model.safetensors").keys()
        assert any("lora_sparse_mask" in k for k in keys) and not any("second" in k for k in keys), sorted(keys)[:4]
    return list(KINDS)


def load(roots: list[Path]) -> list[str]:
    checked = noimport(roots[0])  # before anything imports prune_peft
    from peft import PeftModel

    import prune_peft  # noqa: F401  (the one line users need)

    for root in roots:
        for kind in KINDS:
            path = root / kind
            expected = torch.load(path / "expected.pt")["logits"]
            base = pruned_model()
            zeros = {n: m.weight == 0 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
            model = PeftModel.from_pretrained(base, path).eval()
            assert type(model.peft_config["default"]).__module__.startswith("prune_peft."), model.peft_config
            model.load_adapter(path / "second", adapter_name="second")
            with torch.no_grad():
                torch.testing.assert_close(model(inputs()).logits, expected, atol=1e-5, rtol=0)
                merged = model.merge_and_unload()
                torch.testing.assert_close(merged(inputs()).logits, expected, atol=1e-5, rtol=0)
            for name, module in merged.named_modules():
                if name in zeros and "lm_head" not in name:
                    assert not bool((zeros[name] & (module.weight != 0)).any()), name
            checked.append(f"{root.name}/{kind}")
    return checked


def noimport(root: Path) -> list[str]:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    # a base built without touching prune_peft (importing any of it would register the types)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    assert "prune_peft" not in sys.modules
    try:
        PeftModel.from_pretrained(base, root / "sparse_lora")
    except (KeyError, ValueError) as exc:
        return [f"refused: {type(exc).__name__}: {exc}"]
    raise AssertionError("loading a SPARSE_LORA adapter without `import prune_peft` should fail")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    mode, *dirs = sys.argv[1:]
    roots = [Path(d) for d in dirs]
    result = {"save": lambda: save(roots[0]), "load": lambda: load(roots)}
    checked = result[mode]()
    import peft

    print(json.dumps({"peft": peft.__version__, "checked": checked}))
