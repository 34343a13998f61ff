"""A small marked set of tests on the embedded SmolLM2-135M model (CI runs them too)."""

import pytest

from prune_peft.models import cache_dir

pytestmark = pytest.mark.slow


def test_embedded_model_converted_once_and_cached(embedded):
    model, tok = embedded
    assert (cache_dir() / "smollm2-135m" / ".complete").exists()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tok.eos_token == "<|im_end|>"
