import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine contention makes them 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
