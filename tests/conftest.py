"""Fixtures shared by the package's test modules."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and some test modules import it before
# the kernels package could set it (torch.utils.flop_counter does): set it for the whole session.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: models of a few thousand parameters are bound by the
    per-operation overhead, which extra threads only add to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
