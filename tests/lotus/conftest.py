import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The pipeline's tiny models gain nothing from threads, and OpenMP barriers stall on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
