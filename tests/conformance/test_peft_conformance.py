"""peft's own generic tuner checks (``PeftCommonTester``) run against SPARSE_LORA and SPP on pruned toy models.

The harness comes from the sdist of the installed peft version (see ``peft_harness.py``). Every check that applies
runs; ``NOT_APPLICABLE`` lists the ones that cannot, with the reason. On top of peft's checks, each case verifies
the sparsity property peft does not know about: a merged model has no non-zero where the pruned base had a zero.
"""

import os

import pytest
import torch
from peft import get_peft_model
from peft_harness import HarnessUnavailable, load_testing_common
from torch import nn

import prune_peft  # noqa: F401  (registers the adapter types)
from prune_peft.sparsity import nm_mask
from prune_peft.testing import tiny_causal_lm
from prune_peft.tuners import SparseLoraConfig, SPPConfig

try:
    testing_common = load_testing_common()
except HarnessUnavailable as exc:  # PyPI unreachable: say so loudly, fail when CI demands the harness
    if os.environ.get("PRUNE_PEFT_REQUIRE_HARNESS"):
        raise
    pytest.skip(f"peft harness unavailable: {exc}", allow_module_level=True)

PeftCommonTester = testing_common.PeftCommonTester


def _prune_(model: nn.Module, skip=("lm_head", "lin2")) -> nn.Module:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(s in name for s in skip):
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    return model


class PrunedMLP(nn.Module):
    """peft's toy ``MLP``, a bit wider (rank-20 SVD merges need ≥ 20 features), hidden linears 2:4-pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(32, 64)
        self.lin1 = nn.Linear(64, 32)
        self.lin2 = nn.Linear(32, 2)

    def forward(self, X):
        X = torch.relu(self.lin0(X.float()))
        X = torch.relu(self.lin1(X))
        return torch.log_softmax(self.lin2(X), dim=-1)


class PrunedToyModels:
    """``transformers_class`` for the harness: ``from_pretrained(model_id)`` → a seeded, 2:4-pruned toy model."""

    @staticmethod
    def from_pretrained(model_id, dtype=None, **kwargs):
        torch.manual_seed(0)
        if model_id == "PrunedMLP":
            model = _prune_(PrunedMLP())
        elif model_id == "PrunedTinyLlama":
            model = _prune_(tiny_causal_lm(num_hidden_layers=2, max_position_embeddings=64))
            model.config._name_or_path = model.name_or_path = model_id
        else:  # a merged model saved by a check
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype or torch.float32)
        return model.to(dtype) if dtype is not None else model


MLP_TARGETS = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_TARGETS = {"target_modules": LLAMA_LINEARS, "init_lora_weights": False}
CASES = [
    ("PrunedMLP", SparseLoraConfig, {**MLP_TARGETS, "r": 8}),  # the harness assumes r=8
    ("PrunedMLP", SPPConfig, {**MLP_TARGETS, "n_blocks": 4}),
    ("PrunedTinyLlama", SparseLoraConfig, {**LLAMA_TARGETS, "r": 8}),
    ("PrunedTinyLlama", SPPConfig, LLAMA_TARGETS),
    # SPP's blockwise forward differs only inside the layer: the checks that exercise forward, merge and training
    ("PrunedMLP", SPPConfig, {**MLP_TARGETS, "n_blocks": 4, "forward_mode": "blockwise"}),
]
BLOCKWISE_CHECKS = ["_test_merge_layers", "_test_merge_layers_multi", "_test_safe_merge", "_test_training"]

GENERIC = [
    "_test_model_attr",
    "_test_adapter_name",
    "_test_save_pretrained",
    "_test_save_pretrained_selected_adapters",
    "_test_save_pretrained_adapter_name_substring",
    "_test_from_pretrained_config_construction",
    "_test_load_model_low_cpu_mem_usage",
    "_test_load_multiple_adapters",
    "_test_inference_safetensors",
    "_test_merge_layers",
    "_test_merge_layers_multi",
    "_test_merge_layers_is_idempotent",
    "_test_merge_layers_nan",
    "_test_merge_layers_fp16",
    "_test_safe_merge",
    "_test_unload_adapter",
    "_test_delete_adapter",
    "_test_delete_inactive_adapter",
    "_test_delete_unknown_adapter_raises",
    "_test_adding_multiple_adapters_with_bias_raises",
    "_test_training",
    "_test_weighted_combination_of_adapters",
    "_test_get_base_model_state_dict",
    "_test_lora_conversion",
    "_test_peft_model_device_map",
    "_test_add_adapter_no_autocast_adapter_dtype",
]
EXTRA_ARGS = {"_test_add_adapter_no_autocast_adapter_dtype": {"dtype": torch.bfloat16}}
DECODER_ONLY = [
    "_test_disable_adapter",
    "_test_prepare_for_training",
    "_test_generate",
    "_test_generate_half_prec",
    "_test_training_gradient_checkpointing",
    "_test_training_layer_indexing",
]

# Checks of PeftCommonTester that do not apply to these adapter types, and why.
NOT_APPLICABLE = {
    "_test_mixed_adapter_batches": "runs only for config_cls in (LoraConfig, RoadConfig) (an equality check, not "
    "issubclass); mixed-adapter batches are covered by tests/tuners/test_sparse_adapters.py::test_multiple_adapters",
    "_test_generate_with_mixed_adapter_batches_and_beam_search": "same LoraConfig-only gate as mixed adapter batches",
    "_test_training_prompt_learning_tasks": "prompt-learning methods only",
    "_test_passing_input_embeds_works": "needs a test_name argument specific to peft's decoder matrix; "
    "inputs_embeds is exercised by _test_prepare_for_training",
    "_test_generate_pos_args": "tests PeftModel.generate's argument handling, independent of the adapter type",
    "_test_disable_adapter[PrunedMLP]": "compares generate() scores, so it needs a generative model; the MLP gets "
    "the same check without generate in test_merged_toy_models_keep_every_zero",
    "_test_weighted_combination_of_adapters[SPP]": "SPP adapters are not B·A products, so add_weighted_adapter "
    "refuses them with a ValueError",
}


def _matrix():
    params = []
    for model_id, cls, kwargs in CASES:
        checks = GENERIC + (DECODER_ONLY if model_id == "PrunedTinyLlama" else [])
        mode = kwargs.get("forward_mode", "")
        if mode == "blockwise":
            checks = BLOCKWISE_CHECKS
        for check in checks:
            if check == "_test_weighted_combination_of_adapters" and cls is SPPConfig:
                continue
            ident = f"{model_id}-{cls.__name__}{'-' + mode if mode else ''}-{check.removeprefix('_test_')}"
            params.append(pytest.param(check, model_id, cls, kwargs, id=ident))
    return params


class _Tester(PeftCommonTester):
    transformers_class = PrunedToyModels
    torch_device = "cpu"


class TestPeftConformance(_Tester):
    @pytest.mark.parametrize(("check", "model_id", "config_cls", "config_kwargs"), _matrix())
    def test_generic(self, check, model_id, config_cls, config_kwargs):
        if not hasattr(self, check):
            pytest.skip(f"{check} is not part of peft {testing_common.__name__}'s harness")
        self._model_id = model_id
        getattr(self, check)(model_id, config_cls, dict(config_kwargs), **EXTRA_ARGS.get(check, {}))

    def prepare_inputs_for_testing(self):
        if self._model_id == "PrunedMLP":
            return {"X": torch.randn(9, 32, generator=torch.Generator().manual_seed(0)) * 3}
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.mark.parametrize(("model_id", "config_cls", "config_kwargs"), [c[:3] for c in CASES])
def test_merged_toy_models_keep_every_zero(model_id, config_cls, config_kwargs):
    base = PrunedToyModels.from_pretrained(model_id).eval()
    zeros = {n: m.weight == 0 for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(4, 32) if model_id == "PrunedMLP" else torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = base(x) if model_id == "PrunedMLP" else base(x).logits
    peft_model = get_peft_model(base, config_cls(**config_kwargs)).eval()
    out = lambda m: m(x) if model_id == "PrunedMLP" else m(x).logits  # noqa: E731
    with torch.no_grad():
        assert not torch.allclose(out(peft_model), before)
        with peft_model.disable_adapter():
            torch.testing.assert_close(out(peft_model), before)
    merged = peft_model.merge_and_unload()
    for name, module in merged.named_modules():
        if name in zeros:
            assert not bool((zeros[name] & (module.weight != 0)).any()), name


def test_not_applicable_checks_exist_in_the_harness():
    """The N/A list names real harness checks (so it is updated when peft renames them)."""
    for check in NOT_APPLICABLE:
        assert hasattr(PeftCommonTester, check.split("[")[0]), check
