"""Shared fixtures (the builders live in tests/helpers.py)."""

from __future__ import annotations

import pytest
from torch import nn
from torch.utils.data import TensorDataset

from tests.helpers import make_mlp, make_task


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp()


@pytest.fixture
def task_a() -> TensorDataset:
    return make_task(seed=1)


@pytest.fixture
def task_b() -> TensorDataset:
    return make_task(seed=2)
