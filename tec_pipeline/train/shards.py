"""The shards a training process reads: their image ranges, which images are valid, and a small
pool of open shards from which a batch's targets are gathered in their stored dtypes."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from ..cache.reader import ShardBuffer
from .interfaces import TargetReader


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
                out = {name: np.empty((len(images),) + shape, dtype)
                       for name, (dtype, shape) in data.fields(self.attn_rows).items()}
            sel = np.flatnonzero(shards == shard)
            data.take(local[sel], views[sel], self.attn_rows, out, sel)
        return out
