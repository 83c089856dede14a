import pytest
import torch

# Tiny models run fastest on one intra-op thread, and two xdist workers on two cores must not
# oversubscribe them (OpenMP spin-waits then slow every process many times over).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """10 images in 2 class folders, assorted sizes and modes (`test_cache_targets.write_images`),
    once per module that asks for them."""
    from test_cache_targets import write_images

    return write_images(tmp_path_factory.mktemp("images"))
