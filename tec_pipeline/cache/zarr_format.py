"""The zarr v3 store's format (the default store), shared by its writer (`zarr_write`) and
reader (`zarr_read`): one group, one sharded array per target.

Layout. Arrays are indexed ``[image, view, ...]`` (crop, feat, feat_step, feat_mean,
feat_std, attn, topk_idx) or ``[image]`` (valid, label). Sharding codec: a shard holds
``images_per_shard`` images (all their views), so a cache shard is one file per array and
writers of different shards never share a file. Inside a shard, a chunk is **one view of one
image** (``[1, 1, ...]``), one image for per-image arrays: training reads one view of an image
at a time, and a per-view chunk lets ``read_view`` fetch and decode 1/views of what an
image-sized chunk would cost, for a larger shard index (16 bytes per chunk). Chunks go
through the codecs of ``cache.compress`` (``chunk_codec``: zstd with its checksum, or lz4 /
none with a crc32c); the shard index keeps zarr's default crc32c, so a corrupted chunk or
index is detected on read. Every chunk of a written shard is stored (zeros
too), so a missing chunk means damage.
"""
from __future__ import annotations

import zarr

from ..files import is_local
from .schema import ArraySpec

MAX_UINT_64 = 2**64 - 1
DIM_NAMES = {
    "crop": ("image", "view", "param"),
    "feat": ("image", "view", "patch", "channel"),
    "feat_step": ("image", "view", "channel"),
    "feat_mean": ("image", "view", "channel"),
    "feat_std": ("image", "view", "channel"),
    "attn": ("image", "view", "query", "head", "patch"),
    "topk_idx": ("image", "view", "rank"),
    "valid": ("image",),
    "label": ("image",),
}


def array_layout(spec: ArraySpec, meta: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, chunk shape, shard shape) of one array."""
    n, v, s = int(meta["num_images"]), int(meta["views"]), int(meta["images_per_shard"])
    if spec.per_view:
        return (n, v) + spec.tail, (1, 1) + spec.tail, (s, v) + spec.tail
    return (n,), (1,), (s,)


def shard_key(name: str, ndim: int, shard: int) -> str:
    """The shard file of an array, relative to the group (zarr's default '/' key encoding)."""
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))



def zarr_store(url: str, fs, root: str):
    """zarr's store of a cache folder: LocalStore for local paths (atomic file writes), FsspecStore
    for any other URL."""
    if is_local(fs):
        return zarr.storage.LocalStore(root)
    return zarr.storage.FsspecStore.from_url(url)
