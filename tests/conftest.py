import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: a second thread only adds synchronisation, and on a
    busy 2-core machine it contends with everything else (measured: train.py ~50x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
