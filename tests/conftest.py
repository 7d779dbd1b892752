import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


def pytest_configure(config):
    # A pytest-xdist worker (make test) shares the machine with the others: one thread each, and the interpreters and
    # process groups it starts inherit OMP_NUM_THREADS=1, instead of every process running a thread per core.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine contention makes them 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
