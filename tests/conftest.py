"""Fixtures shared by the package's test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: models of a few thousand parameters are bound by the
    per-operation overhead, which extra threads only add to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
