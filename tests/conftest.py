import pytest
import torch

# Tiny models run fastest on one intra-op thread, and two xdist workers on two cores must not
# oversubscribe them (OpenMP spin-waits then slow every process many times over).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
