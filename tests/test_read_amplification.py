"""Stage two reads only the views an epoch uses: one epoch from a V-view cache, counted at the
filesystem, requests about the bytes of the views it takes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from helpers import CountingFileSystem
from tec_pipeline.cache import open_cache
from tec_pipeline.train.batches import CachedBatches
from tec_pipeline.train.loader import epoch_loader
from tec_pipeline.train.batches import reader_shards
from tec_pipeline.train.loader import epoch_order, plan_epoch, view_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import read_amplification  # noqa: E402  (benchmarks/ is scripts, not a package)

# ViT-S/16-shaped targets (L=196, C=384, H=6, k=15), so chunk indexes weigh what they do at scale
N, V, K, S = 24, 4, 15, 8


def write_cache(url: str, store: str) -> None:
    """The benchmark's synthetic cache (Gaussian targets through the store API) at test size."""
    args = argparse.Namespace(images=N, views=V, images_per_shard=S, shape="vits")
    read_amplification.write_cache(url, store, args)


@pytest.fixture(scope="module", params=["zarr", "webdataset"])
def cache(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_cache(str(root / "c"), request.param)
    return root / "c"


def one_epoch(path, mode: str, epoch: int = 1) -> tuple[int, int, int]:
    """(bytes requested, bytes of the views used, batches) of one epoch read through counting://."""
    reader = open_cache(f"counting://{path}")
    fs = reader.fs
    assert isinstance(fs, CountingFileSystem)  # read as object storage would be: range requests
    order = epoch_order(reader_shards(reader), None, seed=0, epoch=epoch, buffer_shards=2)
    views = view_indices(order, 0, epoch, V, mode)
    plan = plan_epoch(order, views, batch_size=4)
    fs.requested = 0
    batches = list(epoch_loader(plan, CachedBatches(reader, None, 64, K + 1, buffer_shards=2, render=False), 0, 0))
    used = 0
    for shard, rng in enumerate(reader_shards(reader)):
        mine = (plan.images >= rng.start) & (plan.images < rng.stop)
        used += reader.view_bytes(shard, plan.images[mine] - rng.start, plan.views[mine])
    return fs.requested, used, len(batches)


@pytest.mark.parametrize("mode, goal", [("cycle", 1.1), ("random", 1.5)])
def test_an_epoch_requests_about_the_bytes_of_its_views(cache, mode, goal):
    requested, used, batches = one_epoch(cache, mode)
    assert batches == N // 4
    whole = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and "_done" not in f.parts)
    assert used < whole / (V - 1)  # one view in V: the old whole-shard reads would fail the goal
    assert used <= requested <= goal * used, f"{mode}: {requested / used:.3f} x the bytes of the views used"


def test_cycle_mode_reads_one_range_per_shard_and_array(tmp_path):
    """zarr, cycle: a shard's views of the epoch are one contiguous run in each array's file."""
    write_cache(str(tmp_path / "c"), "zarr")
    reader = open_cache(f"counting://{tmp_path / 'c'}")
    order = epoch_order(reader_shards(reader), None, seed=0, epoch=2, buffer_shards=2)
    plan = plan_epoch(order, view_indices(order, 0, 2, V, "cycle"), batch_size=4)
    reader.fs.requests = 0
    list(epoch_loader(plan, CachedBatches(reader, None, 64, K + 1, buffer_shards=2, render=False), 0, 0))
    arrays = 7  # crop, feat, feat_step, feat_mean, feat_std, attn, topk_idx
    assert reader.fs.requests == reader.num_shards * arrays * 2  # per shard and array: its index, then its data
