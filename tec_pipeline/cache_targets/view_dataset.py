"""Images -> rendered views, for a torch DataLoader whose workers decode and render.

One item is one image with all its V views: the image is decoded once, and the V crops
come from `views.draw_view(seed, image, view)`, so an item is the same on any worker,
in any order, in any run. With `files_only` (a device-side renderer, ``data.loader=dali``) the
worker reads the file and its header only: the item carries the encoded file and the V crops,
and the renderer makes the views on the compute device. Batches never straddle a cache shard, so every run (resumed,
one process or many) feeds the base model exactly the same batches.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..render import ViewRenderer, pack_files, render_files
from ..views import draw_view, sample_view
from ..data.sources import BadImageError, ImageSource, decode_rgb, image_size


class ViewDataset(Dataset):
    """Item `i`: the V rendered views of image `i` (uint8), their crop params, label and validity.

    `first_view`: the views are those numbered ``first_view .. first_view + V - 1`` (a cache that
    grows draws its added views exactly as a cache made with them all draws them)."""

    def __init__(self, source: ImageSource, seed: int, views: int, img_size: int,
                 scale: tuple[float, float], keep_raw: bool = False, files_only: bool = False, first_view: int = 0):
        self.source, self.seed, self.views, self.img_size = source, seed, views, img_size
        self.scale, self.keep_raw, self.files_only = tuple(scale), keep_raw, files_only
        self.numbers = range(first_view, first_view + views)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        if self.files_only:
            return self._file_item(index)
        raw = b""
        try:
            if self.keep_raw:
                raw = self.source.raw(index)
                image = decode_rgb(raw, self.source.name(index))
            else:
                image = self.source.load(index)
        except BadImageError as err:
            # Returned, not raised: a worker's exception reaches the main process as a
            # multi-line traceback, and the run decides (stop or skip) by data.on_bad_image.
            return self._placeholder(index, str(err))
        pixels, params = zip(*(draw_view(image, self.seed, index, v, self.img_size, self.scale)
                               for v in self.numbers))
        return {
            "index": index,
            "views": torch.stack(pixels),
            "crops": torch.from_numpy(np.stack([p.as_array() for p in params])),
            "valid": True,
            "label": self.source.label(index),
            "error": "",
            "raw": raw,
        }

    def _file_item(self, index: int) -> dict:
        """The encoded file and its V crops, drawn from the header's size: the views are rendered later."""
        try:
            raw = self.source.raw(index)
            height, width = image_size(raw, self.source.name(index))
        except (BadImageError, OSError) as err:
            return {**self._placeholder(index, str(err)), "file": b""}
        crops = [sample_view(self.seed, index, v, height, width, self.scale) for v in self.numbers]
        return {"index": index, "crops": torch.from_numpy(np.stack([p.as_array() for p in crops])), "valid": True,
                "label": self.source.label(index), "error": "", "file": raw, "raw": raw if self.keep_raw else b""}

    def _placeholder(self, index: int, error: str) -> dict:
        """A black item marked invalid, so batch shapes stay fixed."""
        return {
            "index": index,
            "views": torch.zeros(self.views, 3, self.img_size, self.img_size, dtype=torch.uint8),
            "crops": torch.zeros(self.views, 5, dtype=torch.int32),
            "valid": False,
            "label": self.source.label(index),
            "error": error,
            "raw": b"",
        }


def collate_views(items: list[dict]) -> dict:
    """Stack tensors; keep per-image scalars and strings as lists; encoded files packed (`pack_files`)."""
    pixels = ({"views": torch.stack([it["views"] for it in items])} if "file" not in items[0]
              else pack_files([it["file"] for it in items]))  # views (B, V, 3, S, S) uint8, or the files
    return {
        **pixels,
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "crops": torch.stack([it["crops"] for it in items]),  # (B, V, 5) int32
        "valid": torch.tensor([it["valid"] for it in items], dtype=torch.bool),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "error": [it["error"] for it in items],
        "raw": [it["raw"] for it in items],
    }


class BatchViews:
    """A loader batch's views, (B, V, 3, S, S) uint8: stacked by the workers, or rendered now on the
    compute device from the files they read (`files_only`). A file the renderer cannot decode marks
    its image invalid with a line naming it (``data.on_bad_image`` then stops or skips)."""

    def __init__(self, renderer: Optional[ViewRenderer], views: int, name_of: Callable[[int], str]):
        self.renderer, self.views, self.name_of = renderer, views, name_of

    def __call__(self, batch: dict):
        if "views" in batch:
            return batch["views"]
        crops = batch["crops"].reshape(-1, 5).numpy()
        views, errors = render_files(self.renderer, batch, crops, self.views, batch["valid"].numpy())
        for i, why in enumerate(errors):
            if why:
                batch["valid"][i] = False
                batch["error"][i] = f"{self.name_of(int(batch['index'][i]))}: {why}"
        return views.view(len(errors), self.views, *views.shape[1:])


def shard_batches(ranges: Iterable[range], batch_images: int) -> list[list[int]]:
    """Image-index batches of at most `batch_images`, cut at every shard boundary."""
    return [list(r[i:i + batch_images]) for r in ranges for i in range(0, len(r), batch_images)]


def view_loader(dataset: ViewDataset, batches: Sequence[Sequence[int]], num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over pre-cut batches; items arrive in batch order whatever the worker count."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_views,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)
