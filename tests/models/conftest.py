"""Fixtures shared by the model tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """These tensors are tiny: a second OpenMP thread buys nothing, and on a busy 2-core machine its
    spin-waits make each op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
