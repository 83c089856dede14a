"""What stage two reads from and the batches it makes: the target cache as training reads it
(`TargetReader`), a pool of its open shards, the source images its views are re-rendered from,
and the batch makers that turn an epoch plan's (image, view) pairs into a batch.

A view is rendered from its source image and its crop parameters: here, in the loader worker,
with `views.render_view` (``data.loader=pil``), or on the compute device by the step from the
encoded file the worker read (``dali``: the batch then carries "files" and "file_ends",
`render.pack_files`, instead of "images"). A cache made with the same renderer gets the very
pixels its base saw. A cache's targets are gathered from the pool in their stored dtypes
(`cache.codecs.decode_batch` widens them on the device).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..cache.pq import PqCodec
from ..cache.reader import ShardBuffer
from ..cache.schema import CacheMismatchError
from ..data import open_source_at
from ..data.sources import BadImageError, ImageSource, decode_rgb, image_size
from ..render import pack_files
from ..views import ViewParams, draw_view, render_view, sample_view


class TargetReader(Protocol):
    """A complete target cache as training reads it: `cache.store.open_cache`'s readers, or any
    object with the same members (the tests hold one in memory)."""

    meta: dict
    num_images: int
    views: int
    num_shards: int
    feat_codec: Optional[PqCodec]  # a pq cache's fitted parts (`decode_batch` needs them); None otherwise

    @property
    def summary(self) -> dict: ...  # stage one's record of the finished cache ("skipped_images", ...)

    def is_complete(self) -> bool: ...
    def shard_range(self, shard: int) -> range: ...

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Every array of a shard, decoded (`valid` is read from it when the summary lacks it)."""

    def open_shard(self, shard: int, wanted: Optional[tuple[np.ndarray, np.ndarray]]) -> ShardBuffer:
        """A shard's targets in their stored dtypes; `wanted` (local images, views) are the views
        the caller will take, which a store may read ahead in coalesced ranges."""

    def image_bytes(self, image: int) -> Optional[bytes]:
        """The encoded source image when the cache stores it, else None."""


class BatchMaker(Protocol):
    """(images, views) of one batch -> the batch: "images" (B, 3, H, W) uint8 views, "crop" (B, 5),
    and for a cache the targets in their stored dtypes (`cache.codecs.decode_batch` widens them)."""

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        """The pairs the calls to come will ask for (one loader worker's part of an epoch)."""

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]: ...


def reader_shards(reader: TargetReader) -> list[range]:
    return [reader.shard_range(s) for s in range(reader.num_shards)]


def valid_mask(reader: TargetReader) -> np.ndarray:
    """Per-image valid flags: from a complete cache's list of skipped images (no data read),
    else scanned shard by shard."""
    summary = reader.summary
    if reader.is_complete() and "skipped_images" in summary:
        valid = np.ones(reader.num_images, dtype=bool)
        valid[np.asarray(summary["skipped_images"], dtype=np.int64)] = False
        return valid
    valid = np.zeros(reader.num_images, dtype=bool)
    for shard in range(reader.num_shards):
        rows = reader.shard_range(shard)
        valid[rows.start:rows.stop] = reader.read_shard(shard)["valid"].astype(bool)
    return valid


class ShardPool:
    """The last few opened shards, so a batch costs no per-sample file reads.

    Targets stay in their stored dtypes (int8 feat + float16 steps, uint8 attention, float16 or
    float32; see `cache.codecs`): `take` returns them compact and `cache.codecs.decode_batch`
    widens a batch to float32 on the compute device. Only the attention rows a run needs are
    returned (any k <= k_max is a prefix).
    """

    def __init__(self, reader: TargetReader, capacity: int, attn_rows: int):
        self.reader, self.capacity, self.attn_rows = reader, max(capacity, 1), attn_rows
        shards = reader_shards(reader)
        self.shard_of = np.concatenate([np.full(len(r), s, dtype=np.int64) for s, r in enumerate(shards)])
        self.starts = np.asarray([r.start for r in shards], dtype=np.int64)
        self.open: OrderedDict[int, ShardBuffer] = OrderedDict()
        self.wanted: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (local images, views) to come
        self.opened = 0  # shards opened so far (tests check chunk-awareness with it)

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        """The (image, view) pairs this pool will take, e.g. one loader worker's part of an
        epoch: a shard opened later reads just its share of them, in coalesced ranges."""
        images, views = np.asarray(images, dtype=np.int64).ravel(), np.asarray(views, dtype=np.int64).ravel()
        shards = self.shard_of[images]
        self.open.clear()  # opened for an earlier plan: their read-ahead was for other views
        self.wanted = {int(s): (images[shards == s] - self.starts[s], views[shards == s]) for s in np.unique(shards)}

    def _shard(self, shard: int) -> ShardBuffer:
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        self.open[shard] = buffer = self.reader.open_shard(shard, self.wanted.get(shard))
        self.opened += 1
        while len(self.open) > self.capacity:
            self.open.popitem(last=False)
        return buffer

    def take(self, images: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Targets and crop params of (image, view) pairs, stacked, in their stored dtypes:
        crop (B, 5), feat (B, L, C) [+ feat_step (B, C) for int8], feat_mean / feat_std (B, C),
        attn (B, rows, H, L), topk_idx (B, rows - 1)."""
        images, views = np.asarray(images, dtype=np.int64), np.asarray(views, dtype=np.int64)
        shards = self.shard_of[images]
        local = images - self.starts[shards]
        order = list(dict.fromkeys(shards.tolist()))  # shards in first-use order
        if len(order) == 1:
            return self._shard(order[0]).take(local, views, self.attn_rows)
        out: Optional[dict[str, np.ndarray]] = None
        for shard in order:  # each shard writes its views straight into the batch arrays
            data = self._shard(shard)
            if out is None:
                out = data.batch_arrays(len(images), self.attn_rows)
            sel = np.flatnonzero(shards == shard)
            data.take(local[sel], views[sel], self.attn_rows, out, sel)
        return out


class CacheImageSource:
    """Source images stored inside the cache (webdataset with `store_images`)."""

    def __init__(self, reader: TargetReader):
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_images

    def name(self, index: int) -> str:
        return f"cache image {index}"

    def raw(self, index: int) -> bytes:
        data = self.reader.image_bytes(index)
        if data is None:
            raise BadImageError(f"{self.name(index)}: not stored in the cache")
        return data

    def load(self, index: int) -> Image.Image:
        return decode_rgb(self.raw(index), self.name(index))


def cache_image_source(reader: TargetReader, data_path: str = "") -> ImageSource:
    """The images a cache was made from: stored in it, `data.path` if given, else the recorded source path.

    The recorded image count (and fingerprint, when the metadata has one) must match.
    """
    if reader.meta.get("store_images"):
        return CacheImageSource(reader)
    recorded = reader.meta.get("source", {}) or {}
    path = data_path or recorded.get("path") or ""
    if not path:
        raise CacheMismatchError("data.path is empty and the cache records no source image path")
    source = open_source_at(recorded.get("kind", "imagefolder"), path)
    if len(source) != reader.num_images:
        raise CacheMismatchError(f"data.path={path} holds {len(source)} images, the cache was made from {reader.num_images}")
    fingerprint = recorded.get("fingerprint")
    if fingerprint and source.fingerprint() != fingerprint:
        raise CacheMismatchError(f"data.path={path} is not the image set the cache was made from (file list differs)")
    return source


class CachedBatches:
    """Batches from a cache: targets from a pool of open shards in their stored dtypes, views
    re-rendered from the cached crops (`render`; off when only the targets are wanted)."""

    def __init__(self, reader: TargetReader, source: Optional[ImageSource], img_size: int, attn_rows: int,
                 buffer_shards: int, render: bool = True, files_only: bool = False):
        self.reader, self.source, self.img_size, self.render = reader, source, img_size, render
        self.files_only = files_only
        self.attn_rows, self.capacity = attn_rows, 2 * buffer_shards  # a batch can straddle two windows
        self.pool: Optional[ShardPool] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pool": None}  # a loader worker opens its own shards

    def _pool(self) -> ShardPool:
        if self.pool is None:  # built lazily: each loader worker keeps its own
            self.pool = ShardPool(self.reader, self.capacity, self.attn_rows)
        return self.pool

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        self._pool().expect(images, views)

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        data = self._pool().take(images, views)
        batch = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in data.items()}
        if self.render and self.files_only:
            batch.update(pack_files([self.source.raw(int(i)) for i in images]))
        elif self.render:
            batch["images"] = torch.stack([render_view(self.source.load(int(i)), ViewParams.from_array(c),
                                                       self.img_size) for i, c in zip(images, data["crop"])])
        return batch


class OnlineBatches:
    """Batches of views drawn afresh from (seed, image, view); online and pixel targets are
    computed on the batch, so there is nothing to read ahead."""

    def __init__(self, source: ImageSource, img_size: int, seed: int, scale: tuple[float, float],
                 files_only: bool = False):
        self.source, self.img_size, self.seed, self.scale = source, img_size, seed, scale
        self.files_only = files_only

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        pass

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        if self.files_only:
            return self.files(images, views)
        drawn = [draw_view(self.source.load(i), self.seed, i, v, self.img_size, self.scale)
                 for i, v in zip(images.tolist(), views.tolist())]
        return {"images": torch.stack([pixels for pixels, _ in drawn]),
                "crop": torch.from_numpy(np.stack([crop.as_array() for _, crop in drawn]))}

    def files(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        """The encoded files and their crops, drawn from each header's size, for a device renderer."""
        files = [self.source.raw(i) for i in images.tolist()]
        crops = [sample_view(self.seed, i, v, *image_size(f, self.source.name(i)), self.scale)
                 for f, i, v in zip(files, images.tolist(), views.tolist())]
        return {**pack_files(files), "crop": torch.from_numpy(np.stack([c.as_array() for c in crops]))}
