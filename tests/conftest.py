"""Shared pytest setup: intra-op threads (tests/threads.py); gpu tests skip without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.threads import intra_op_threads


@pytest.fixture(autouse=True)
def _threads() -> None:
    """One intra-op thread per test process unless CI's second numerics pass asks for more."""
    before = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads())
    yield
    torch.set_num_threads(before)


TIERS = ("unit", "distributed", "e2e", "gpu")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test carries its tier's marker (the folder it lives in), so `-m` selects whole
    # tiers even where a module forgot its pytestmark.
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS and item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
