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
