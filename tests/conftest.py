import os

# Before anything imports huggingface_hub or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from prune_peft.testing import byte_tokenizer, tiny_causal_lm

# Under xdist every worker is a process: one intra-op thread each keeps 2 workers from oversubscribing 2 cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(arch="llama"|"qwen2"|"mistral", seed=0, **config_overrides)."""
    return tiny_causal_lm


@pytest.fixture(scope="session")
def texts():
    from prune_peft.data import shakespeare_texts

    return shakespeare_texts("train", passage_chars=400)[:200]


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M model and tokenizer (slow tests only)."""
    from prune_peft.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")
