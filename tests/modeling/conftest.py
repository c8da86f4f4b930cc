import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # toy-sized ops: on a busy 2-core box a second OpenMP thread costs far more in barriers than it saves
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
