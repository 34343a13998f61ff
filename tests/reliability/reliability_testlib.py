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


# ------------------------------------------------------------------ case accounting (tests/reliability/count_cases.py)

# Tests that are not a bad input or a fault: a valid call still works after all the checks (controls), and what a
# stock tool does that prune_peft cannot change (stock limits, documented in docs/reliability.md). Every other test
# of the campaign is one bad-input case per parameter set, or one fault case in test_faults.py.
CONTROLS = {
    "test_prune_report_roundtrip_kept",
    "test_perplexity_valid_call_still_works",
    "test_transformers_load_adapter_same_base_loads",
    "test_transformers_load_adapter_good_file_runs_and_matches_peft",
    "test_peft_from_pretrained_disarms_on_load",
    "test_saved_config_carries_digests",
    "test_loaded_custom_mask_adapter_saves_and_loads_again",
    "test_writer_puts_the_marker_and_reads_it_back",
    "test_plain_lora_folder_is_not_flagged",
    "test_intact_loraprune_folder_round_trips",
    "test_load_model_with_intact_adapter_loads_it",
    "test_atomic_file_live_writer_temp_kept",
    "test_case_accounting_names_exist",
}
STOCK_LIMITS = {"test_stock_peft_loads_a_markerless_retyped_folder_as_dense_lora"}
FAULT_MODULES = {"test_faults.py"}


def case_kind(nodeid: str) -> str:
    """``bad-input``, ``fault``, ``control`` or ``stock-limit`` for a pytest node id of this folder."""
    path, _, name = nodeid.partition("::")
    name = name.split("[", 1)[0]
    if name in CONTROLS:
        return "control"
    if name in STOCK_LIMITS:
        return "stock-limit"
    return "fault" if path.rsplit("/", 1)[-1] in FAULT_MODULES else "bad-input"
