"""Fixtures for the reliability campaign: tiny pruned models and a snapshot of everything a load could change."""

import torch


def prune24(model):
    from prune_peft.sparsity import nm_mask

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            m.weight.data.mul_(nm_mask(m.weight.data.abs(), 2, 4))
    return model


def snapshot(model):
    """state_dict values, module types and the peft attributes: what a failing call must leave unchanged."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    return sd, types, hasattr(model, "peft_config"), sorted(getattr(model, "peft_config", {}) or {})


def assert_unchanged(before, model):
    sd, types, has_cfg, cfg = snapshot(model)
    assert types == before[1], "module types changed"
    assert sd.keys() == before[0].keys(), "state_dict keys changed"
    for k, v in sd.items():
        assert torch.equal(v, before[0][k]), f"{k} changed"
    assert (has_cfg, cfg) == before[2:], "peft_config changed"
