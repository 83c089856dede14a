"""Where a pq cache keeps its fitted parts (``pq.PqCodec``): a zarr v3 group ``feat_codec`` in the
cache's folder, so zarr itself reads them (``zarr.open_group(cache)["feat_codec/rotation"]``)
beside the codes (``feat``) of either store:

- ``feat_codec/rotation`` (C, C) float32, dims (channel, direction): R, columns by eigenvalue;
- ``feat_codec/codebooks`` (M, 256, d) float32, dims (subvector, centroid, value): Q;
- the group's attributes: ``codec`` ("pq-pca") and ``sha256`` (``PqCodec.sha256``).

The parts are written once, by the process that fits them, before any shard is written; their
digest is then recorded in the cache's identity (``schema.PQ_PARTS_KEY``), which is what makes
them the cache's parts: a reader checks the parts against it, so damaged or replaced parts are
refused instead of decoding every view wrongly.
"""
from __future__ import annotations

import zarr

from .pq import PqCodec
from .schema import CacheCorruptError, pq_parts_digest
from .storage import join
from .zarr_format import zarr_store

PARTS_GROUP = "feat_codec"
PART_DIMS = {"rotation": ("channel", "direction"), "codebooks": ("subvector", "centroid", "value")}


def write_parts(url: str, fs, root: str, codec: PqCodec) -> None:
    """Write the parts as the group ``feat_codec`` (anything a crashed earlier fit left there is replaced)."""
    group = zarr.open_group(zarr_store(url, fs, root), path=PARTS_GROUP, mode="w", zarr_format=3)
    for name, array in codec.arrays().items():
        group.create_array(name, data=array, chunks=array.shape, dimension_names=PART_DIMS[name])
    group.attrs.update(codec="pq-pca", sha256=codec.sha256())


def read_parts(url: str, fs, root: str, meta: dict) -> PqCodec:
    """The parts of a pq cache whose identity records their digest, checked against it."""
    where = join(url, PARTS_GROUP)
    rebuild = "rebuild the cache with `tec-pipeline cache-targets` and the same config plus --overwrite"
    try:
        group = zarr.open_group(zarr_store(url, fs, root), path=PARTS_GROUP, mode="r")
        codec = PqCodec.from_arrays({name: group[name][...] for name in PART_DIMS})
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CacheCorruptError(f"cache {url}: its pq parts {where} cannot be read ({err}); {rebuild}") from None
    if codec.sha256() != pq_parts_digest(meta):
        raise CacheCorruptError(f"cache {url}: its pq parts {where} do not match the digest its identity records; "
                                f"{rebuild}")
    return codec
