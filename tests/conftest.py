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


def _count_cpu_flash_attention() -> None:
    """Some torch builds (2.14) give FlopCounterMode no formula for the CPU flash-attention kernel that
    ``F.scaled_dot_product_attention`` dispatches to on CPU, so attention would count 0 FLOPs. Register
    torch's own SDPA formulas for it; builds that already count it are left alone."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    for name, formula in [
        ("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop),
    ]:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.flop_registry[op] = formula  # already shape-wrapped by its registration


_count_cpu_flash_attention()
