"""Stage two's batches: views re-rendered from their source images, paired with their targets.

A view is rendered from its source image and its crop parameters with `views.render_view`, the
one renderer stage one used, so the pixels are bit-identical to those the base model saw.
Targets come from the cache (`CachedBatches`: the stored dtypes, int8 / uint8 / float16, are
dequantized on the compute device by `batch_targets`) or are computed on the batch, by the base
model or from the pixels, for which `OnlineBatches` renders the views alone.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache.reader import ShardTargets
from ..cache.codecs import ATTN_STEP
from ..cache.schema import CacheMismatchError
from ..data import open_source_at
from ..data.sources import BadImageError, ImageSource, decode_rgb
from ..targets import Targets
from ..views import ViewParams, draw_view, render_view
from .order import EpochPlan

TARGET_FIELDS = ("feat", "feat_mean", "feat_std", "attn", "topk_idx")


class TargetReader(Protocol):
    """The reader API of `tec_pipeline.cache.store.open_cache` that training uses."""

    meta: dict
    num_images: int
    views: int
    num_shards: int

    def is_complete(self) -> bool: ...
    def shard_range(self, shard: int) -> range: ...
    def read_shard(self, shard: int) -> dict[str, np.ndarray]: ...
    def image_bytes(self, image: int) -> Optional[bytes]: ...


def reader_shards(reader: TargetReader) -> list[range]:
    return [reader.shard_range(s) for s in range(reader.num_shards)]


def valid_mask(reader: TargetReader) -> np.ndarray:
    """Per-image valid flags: from a complete cache's list of skipped images (no data read),
    else scanned shard by shard."""
    summary = (getattr(reader, "doc", None) or {}).get("summary") or {}
    if reader.is_complete() and "skipped_images" in summary:
        valid = np.ones(reader.num_images, dtype=bool)
        valid[np.asarray(summary["skipped_images"], dtype=np.int64)] = False
        return valid
    valid = np.zeros(reader.num_images, dtype=bool)
    for shard in range(reader.num_shards):
        rows = reader.shard_range(shard)
        valid[rows.start:rows.stop] = reader.read_shard(shard)["valid"].astype(bool)
    return valid


# ---------------------------------------------------------------- cached targets
class OpenShards:
    """The last few opened shards, so a batch costs no per-sample file reads.

    Targets stay in their stored dtypes (int8 feat + float16 steps, uint8 attention, float16
    or float32; see `cache.codecs`): `take` returns them compact and `dequantize_targets` turns a
    batch into float32 on the compute device. Readers with ``open_shard`` (the cache stores)
    decode only the views a batch takes; other readers are read whole with ``read_shard``.
    Only the attention rows a run needs are returned (any k <= k_max is a prefix).
    """

    def __init__(self, reader: TargetReader, capacity: int, attn_rows: int):
        self.reader, self.capacity, self.attn_rows = reader, max(capacity, 1), attn_rows
        shards = reader_shards(reader)
        self.shard_of = np.concatenate([np.full(len(r), s, dtype=np.int64) for s, r in enumerate(shards)])
        self.starts = np.asarray([r.start for r in shards], dtype=np.int64)
        self.open: OrderedDict[int, ShardTargets] = OrderedDict()
        self.wanted: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (local images, views) to come
        self.decoded = 0  # shards opened so far (tests check chunk-awareness with it)

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        """The (image, view) pairs this reader will take, e.g. one loader worker's part of an
        epoch: a shard opened later reads just its share of them, in coalesced ranges."""
        images, views = np.asarray(images, dtype=np.int64).ravel(), np.asarray(views, dtype=np.int64).ravel()
        shards = self.shard_of[images]
        self.open.clear()  # opened for an earlier plan: their read-ahead was for other views
        self.wanted = {int(s): (images[shards == s] - self.starts[s], views[shards == s]) for s in np.unique(shards)}

    def _shard(self, shard: int) -> ShardTargets:
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        opener = getattr(self.reader, "open_shard", None)
        kept = opener(shard, self.wanted.get(shard)) if opener is not None \
            else ShardTargets(self.reader.read_shard(shard))
        self.open[shard] = kept
        self.decoded += 1
        while len(self.open) > self.capacity:
            self.open.popitem(last=False)
        return kept

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


def dequantize_targets(feat: Tensor, feat_mean: Tensor, feat_std: Tensor, attn: Tensor, topk_idx: Tensor,
                       feat_step: Optional[Tensor] = None) -> Targets:
    """float32 `Targets` from a cached batch in its stored dtypes, computed where the tensors are.

    * ``feat`` int8 ``q`` (B, L, C) with ``feat_step`` float16 ``s`` (B, C):
      ``feat = float32(q) * float32(s)[:, None, :]`` (`codecs.decode_feat_int8`);
    * ``attn`` uint8 ``u``: ``attn = float32(u) * float32(-0.1)``, the logits minus their row max
      (`codecs.decode_attn_uint8`);
    * float16 arrays are widened to float32, float32 ones kept; ``topk_idx`` becomes int64.

    Every widening is exact and each product is one correctly rounded float32 multiply, as in
    `codecs.decode`'s numpy math, so the values are bit-identical to ``read_shard``'s.
    """
    if feat.dtype == torch.int8:
        if feat_step is None:
            raise ValueError("int8 features need their feat_step")
        feat = feat.float() * feat_step.float()[:, None, :]
    if attn.dtype == torch.uint8:
        attn = attn.float() * float(np.float32(-ATTN_STEP))  # the float32 step, exactly
    return Targets(feat=feat.float(), feat_mean=feat_mean.float(), feat_std=feat_std.float(), attn=attn.float(),
                   topk_idx=topk_idx.long())


def batch_targets(batch: dict[str, Tensor], device: torch.device | str) -> Targets:
    """The cached targets of a batch as float32 `targets.Targets` on `device`: the compact
    stored dtypes travel to the device and are dequantized there (`dequantize_targets`)."""
    names = TARGET_FIELDS + (("feat_step",) if "feat_step" in batch else ())
    return dequantize_targets(**{name: batch[name].to(device, non_blocking=True) for name in names})


# ---------------------------------------------------------------- source images
class CacheImageSource:
    """Source images stored inside the cache (webdataset with `store_images`)."""

    def __init__(self, reader: TargetReader):
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_images

    def load(self, index: int) -> Image.Image:
        data = self.reader.image_bytes(index)
        if data is None:
            raise BadImageError(f"cache image {index}: not stored in the cache")
        return decode_rgb(data, f"cache image {index}")


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


# ---------------------------------------------------------------- batch makers
class CachedBatches:
    """Batches from a cache: targets from the open shards in their stored dtypes (turn them into
    float32 with `batch_targets`), views re-rendered from the cached crops."""

    def __init__(self, reader: TargetReader, source: Optional[ImageSource], img_size: int, attn_rows: int,
                 buffer_shards: int, render: bool = True):
        self.reader, self.source, self.img_size, self.render = reader, source, img_size, render
        self.attn_rows, self.capacity = attn_rows, 2 * buffer_shards  # a batch can straddle two windows
        self.shards: Optional[OpenShards] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "shards": None}  # a loader worker opens its own shards

    def _open_shards(self) -> OpenShards:
        if self.shards is None:  # built lazily: each loader worker keeps its own
            self.shards = OpenShards(self.reader, self.capacity, self.attn_rows)
        return self.shards

    def expect(self, images: np.ndarray, views: np.ndarray) -> None:
        """The pairs the calls to come will ask for (`OpenShards.expect`)."""
        self._open_shards().expect(images, views)

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        data = self._open_shards().take(images, views)
        batch = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in data.items()}
        if self.render:
            batch["images"] = torch.stack([render_view(self.source.load(int(i)), ViewParams.from_array(c),
                                                       self.img_size) for i, c in zip(images, data["crop"])])
        return batch


class OnlineBatches:
    """Batches of rendered views only (online and pixel targets are computed on the batch)."""

    def __init__(self, source: ImageSource, img_size: int, seed: int, scale: tuple[float, float]):
        self.source, self.img_size, self.seed, self.scale = source, img_size, seed, scale

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        drawn = [draw_view(self.source.load(i), self.seed, i, v, self.img_size, self.scale)
                 for i, v in zip(images.tolist(), views.tolist())]
        return {"images": torch.stack([pixels for pixels, _ in drawn]),
                "crop": torch.from_numpy(np.stack([crop.as_array() for _, crop in drawn]))}


class EpochBatches(IterableDataset):
    """The batches of one epoch from `start`; loader worker w makes batches start+w, start+w+W, ...

    The DataLoader takes one batch from each worker in turn, so the batch order does not
    depend on the number of workers.
    """

    def __init__(self, plan: EpochPlan, make_batch: Callable[[np.ndarray, np.ndarray], dict], start: int = 0,
                 masks: Optional[Callable[[int], Tensor]] = None):
        self.plan, self.make_batch, self.start, self.masks = plan, make_batch, start, masks

    def __len__(self) -> int:
        return max(len(self.plan) - self.start, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(self.start + worker, len(self.plan), workers)
        if hasattr(self.make_batch, "expect") and len(mine):  # this worker's views of the epoch, read ahead by shard
            self.make_batch.expect(self.plan.images[mine.start::workers], self.plan.views[mine.start::workers])
        for b in mine:
            batch = self.make_batch(self.plan.images[b], self.plan.views[b])
            batch["index"] = torch.from_numpy(self.plan.images[b].copy())
            batch["view"] = torch.from_numpy(self.plan.views[b].copy())
            if self.masks is not None:  # drawn here, in the loader workers, off the step's path
                batch["mask_noise"] = self.masks(int(self.plan.first_samples[b]))
            yield batch


def epoch_loader(plan: EpochPlan, make_batch: Callable, start: int, num_workers: int,
                 pin_memory: bool = False, masks: Optional[Callable[[int], Tensor]] = None) -> DataLoader:
    """A DataLoader over one epoch's batches (already collated by `make_batch`); with `masks`
    (first sample -> noise), each batch also carries its "mask_noise"."""
    workers = min(num_workers, max(len(plan) - start, 0))
    return DataLoader(EpochBatches(plan, make_batch, start, masks), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None)
