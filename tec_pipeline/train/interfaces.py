"""The roles on stage two's data path, declared: what the loader asks of a target cache, and what
turns an epoch plan's (image, view) pairs into a batch."""
from __future__ import annotations

from typing import Optional, Protocol

import numpy as np
from torch import Tensor

from ..cache.pq import PqCodec
from ..cache.reader import ShardBuffer


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
