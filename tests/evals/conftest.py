"""Evaluation tests drive tiny models whose matrices are too small to gain from intra-op threads;
one thread keeps them fast and steady when the machine is busy (restored after each test)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
