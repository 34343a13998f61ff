"""Fixtures for the adapter tests: tiny pruned models (seeded; 2:4 or unstructured) and token ids."""

import pytest
import torch
from adapter_testlib import prune_linears

from prune_peft.testing import tiny_causal_lm


@pytest.fixture
def pruned():
    """Factory: pruned(pattern="2:4"|"unstructured", seed=0, arch="llama", **config) → a pruned tiny causal LM.

    Two decoder layers (not the default four) keep the many merge/save round trips fast.
    """

    def make(pattern: str = "2:4", seed: int = 0, arch: str = "llama", **cfg):
        cfg.setdefault("num_hidden_layers", 2)
        return prune_linears(tiny_causal_lm(arch=arch, seed=seed, **cfg), pattern)

    return make


@pytest.fixture
def ids():
    return torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
