"""Shared pytest set-up: tests run on CPU with tiny models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and 2-thread OpenMP crawls on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
