"""The batch makers of stage two (`interfaces.BatchMaker`): an epoch plan's (image, view) pairs
-> a batch of views re-rendered from their source images, with their targets when cached.

A view is rendered from its source image and its crop parameters: here, in the loader worker,
with `views.render_view` (``data.loader=pil``), or on the compute device by the step from the
encoded file the worker read (``dali``: the batch then carries "files" and "file_ends",
`render.pack_files`, instead of "images"). A cache made with the same renderer gets the very
pixels its base saw.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..data.sources import ImageSource, image_size
from ..render import pack_files
from ..views import ViewParams, draw_view, render_view, sample_view
from .interfaces import TargetReader
from .shards import ShardPool


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
