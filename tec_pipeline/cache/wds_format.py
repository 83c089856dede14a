"""The webdataset store's format, shared by its writer (`wds_write`) and reader (`wds_read`):
size-bounded tar shards grouped by view index, for streaming.

Files of shard s: ``shard-{s:05d}-v{view:02d}-{part:03d}.tar``, one group of parts per view
index, and ``shard-{s:05d}-img-{part:03d}.tar`` with the encoded source images
(``store_images``), stored once, apart from the targets. An epoch uses one view per image, so
streaming it reads one view group of every shard (``tar_urls(view)``): about 1/V of the cache.
Samples go to part 0 until the next would push it past ``meta["max_part_bytes"]``, then to
part 1, and so on. Sample key = the zero-padded image index; members (webdataset naming
``{key}.{suffix}``):

- view tars: ``{key}.{array}.npy.zst`` for feat (pq: its codes), feat_step (int8 only), feat_mean, feat_std,
  attn, topk_idx of that one view in the storage dtype (``codecs``), ``.npy`` bytes compressed
  by zstd (level from meta, with checksum: a damaged member is detected), and ``{key}.json``:
  image index, view, valid, label and the view's crop ``[top, left, height, width, flip]``;
- image tars: ``{key}.jpg`` / ``.png`` / ``.webp`` / ``.bin``.

Tars are built in memory with fixed headers (mtime 0, uid 0, no user names), so the same data
gives the same bytes, then written whole: temporary name + rename on local disks, one PUT
elsewhere (fsspec). Each shard's completion marker lists, per tar, where each sample's bytes
lie (``samples``: image, start, end), so a reader fetches exactly the samples it needs with
range requests, neighbours coalesced, and never walks tar headers over the network.
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import Optional

import numpy as np
from numcodecs import Zstd

from . import codecs
from .pq import PqCodec
from .schema import array_specs

TAR_BLOCK = 512
IMAGES = "img"


def key_width(num_images: int) -> int:
    return max(8, len(str(max(num_images - 1, 0))))


def group_name(view: int | None) -> str:
    """The file-name group of one view's tars, or of the source images (None)."""
    return IMAGES if view is None else f"v{view:02d}"


def part_name(shard: int, group: str, part: int) -> str:
    return f"shard-{shard:05d}-{group}-{part:03d}.tar"


def tar_members(data: bytes | memoryview) -> dict[str, bytes]:
    """{suffix: bytes} of the members in one sample's span (whole 512-byte header blocks, each
    followed by its padded data), as `_tar_bytes` lays them out."""
    out, pos = {}, 0
    while pos + TAR_BLOCK <= len(data):
        info = tarfile.TarInfo.frombuf(bytes(data[pos:pos + TAR_BLOCK]), tarfile.ENCODING, "surrogateescape")
        start = pos + TAR_BLOCK
        out[info.name.partition(".")[2]] = bytes(data[start:start + info.size])
        pos = start + -(-info.size // TAR_BLOCK) * TAR_BLOCK
    return out


def stored_arrays(meta: dict) -> list[str]:
    """Per-view arrays kept as ``.npy.zst`` members (crop goes to the json)."""
    return [n for n, s in array_specs(meta).items() if s.per_view and n != "crop"]


def decode_sample(sample: dict[str, bytes], meta: dict, pq: Optional[PqCodec] = None) -> dict[str, np.ndarray]:
    """One view-tar sample (``{suffix: bytes}``, as ``webdataset`` yields it with no decoders)
    -> the decoded arrays of ``CacheReader.read_view`` for that image and view (`pq`: a pq
    cache's parts, the reader's ``feat_codec``)."""
    return codecs.decode(sample_arrays(sample, meta), meta["feat_dtype"], meta["attn_dtype"], pq)


def sample_arrays(sample: dict[str, bytes], meta: dict) -> dict[str, np.ndarray]:
    """Encoded arrays of one view of one image; raises KeyError / ValueError / RuntimeError when damaged."""
    info = json.loads(sample["json"])
    out = {name: np.lib.format.read_array(io.BytesIO(Zstd().decode(sample[f"{name}.npy.zst"])),
                                          allow_pickle=False)
           for name in stored_arrays(meta)}
    out["crop"] = np.asarray(info["crop"], dtype=np.int32)
    out["valid"] = np.asarray(info["valid"], dtype=np.uint8)
    out["label"] = np.asarray(info["label"], dtype=np.int64)
    return out
