"""Fixtures of the reliability campaign (helpers live in reliability_testlib, a uniquely named module)."""

import copy

import pytest
from reliability_testlib import prune24

from prune_peft.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def base24():
    return prune24(tiny_causal_lm(num_hidden_layers=2))


@pytest.fixture
def fresh(base24):
    return lambda: copy.deepcopy(base24)
