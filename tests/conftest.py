"""Shared fixtures and markers (plain helper functions are in ``_helpers.py``).

* ``@pytest.mark.needs_op`` (or ``pytestmark = pytest.mark.needs_op``): skip unless the compiled
  dilated_sparse extension loads (checked once, only when a collected test carries the marker).
* ``single_thread`` fixture, opt-in (``pytestmark = pytest.mark.usefixtures("single_thread")``):
  one intra-op thread for tiny tensors, restored afterwards.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_op: skip unless the compiled dilated_sparse extension is available")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("needs_op") is not None]
    if not marked:
        return
    import dilated_sparse as ds

    if ds.extension_available():
        return
    skip = pytest.mark.skip(reason="the compiled dilated_sparse extension is not available")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread is as fast and immune to oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
