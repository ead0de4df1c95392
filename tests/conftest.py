"""Shared test set-up: tests run single-threaded and under inference (no autograd)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entry of one test serves another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
