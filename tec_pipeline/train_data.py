"""Stage two's data: views re-rendered from their source images, paired with their targets.

A view is rendered from its source image and its crop parameters with `views.render_view`,
the one renderer stage one used, so the pixels are bit-identical to those the base model
saw. Targets come from one of three sources:

* ``cache``  - the stage-one cache, read a whole shard at a time (`ShardBuffer`); batches carry
  the stored dtypes (int8 / uint8 / float16) and are dequantized on the compute device
  (`batch_targets`);
* ``online`` - the base model in the loop (targets computed on the batch, `targets.compute_targets`);
* ``pixels`` - MAE's per-patch normalized pixels (`pixels.pixel_targets`), no base model.

Data order is chunk-aware (DESIGN "Storage facts"): random single-view reads through zarr
cost ~2 ms each, whole shards are ~15x faster. So an epoch shuffles the shard order, takes
`buffer_shards` shards at a time and shuffles the images of that window; a batch then touches
at most the shards of one or two windows and every shard is decoded once per epoch (per
loader worker). The online and pixel sources use the same order over the same shard layout,
so a cached and an online run with one seed see the same batches.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache.base import ShardTargets
from .cache.codecs import ATTN_STEP
from .cache.schema import CacheMismatchError  # the one error for a cache that cannot serve a request
from .data.sources import BadImageError, ImageSource, decode_rgb
from .errors import UserError
from .targets import Targets
from .views import ViewParams, render_view, sample_view

VIEW_MODES = ("cycle", "random")


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


# ---------------------------------------------------------------- what the targets look like
@dataclass(frozen=True)
class TargetSpec:
    """Shape of the targets a run trains on: from cache metadata, a base model, or the pixel target."""

    img_size: int
    num_patches: int
    feat_dim: int  # C_base (or p*p*3 for pixels)
    heads: int  # H_base (0: no attention target)
    k_max: int  # attention rows available beyond the cls row


def cache_spec(meta: dict) -> TargetSpec:
    """The `TargetSpec` recorded in a cache's metadata."""
    identity = meta.get("identity", {})
    img_size = identity.get("img_size", meta.get("img_size"))
    return TargetSpec(img_size=int(img_size), num_patches=int(meta["num_patches"]), feat_dim=int(meta["feat_dim"]),
                      heads=int(meta["heads"]), k_max=int(meta["k_max"]))


def base_spec(base, img_size: int) -> TargetSpec:
    """The `TargetSpec` of a base model computing targets online (any k up to L is available)."""
    L = base.patch_embed.num_patches
    return TargetSpec(img_size=img_size, num_patches=L, feat_dim=base.embed_dim,
                      heads=base.blocks[-1].attn.num_heads, k_max=L)


def check_request(spec: TargetSpec, *, img_size: int, num_patches: int, k: int, attention: str,
                  what: str = "the cache") -> None:
    """Refuse, before training, a request the targets cannot serve (DESIGN "The cache").

    Raises `CacheMismatchError` with one line naming the setting: image size, patch grid,
    or ``targets.k`` beyond ``k_max`` (any k <= k_max is a prefix of the stored rows).
    """
    if img_size != spec.img_size:
        raise CacheMismatchError(f"data.img_size={img_size} differs from {what}'s image size {spec.img_size}")
    if num_patches != spec.num_patches:
        raise CacheMismatchError(
            f"model.arch.patch_size gives {num_patches} patches per view, {what} has {spec.num_patches} "
            f"(another patch grid)")
    if attention == "topk" and k > spec.k_max:
        raise CacheMismatchError(f"targets.k={k} exceeds {what}'s k_max={spec.k_max}")
    if attention != "none" and spec.heads == 0:
        raise CacheMismatchError(f"targets.attention={attention} but {what} holds no attention target")


def check_cache_base(meta: dict, checkpoint: Optional[str]) -> None:
    """A given ``base.checkpoint`` must be the one the cache was made with (same SHA-256)."""
    recorded = (meta.get("identity", {}).get("base") or {}).get("checkpoint_sha256")
    if not checkpoint or not recorded:
        return
    from .models.base import file_sha256

    if not Path(checkpoint).is_file():
        raise CacheMismatchError(f"base.checkpoint={checkpoint}: file not found (training from a cache needs no base; "
                                 "leave base.checkpoint empty or point it at the cache's base)")
    if file_sha256(checkpoint) != recorded:
        raise CacheMismatchError(f"base.checkpoint={checkpoint} is not the base model the cache was made with "
                                 f"(SHA-256 differs)")


# ---------------------------------------------------------------- data order
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(v) for v in key]))


def uniform_shards(num_images: int, images_per_shard: int) -> list[range]:
    """The shard layout of a cache with `images_per_shard` (the last shard may be short)."""
    return [range(s, min(s + images_per_shard, num_images)) for s in range(0, num_images, images_per_shard)]


def epoch_order(shards: Sequence[range], valid: Optional[np.ndarray], seed: int, epoch: int,
                buffer_shards: int) -> np.ndarray:
    """Chunk-aware shuffle: random shard order, then a random order inside each window of
    `buffer_shards` consecutive shards; invalid images (valid=0) dropped. Seeded by (seed, epoch)."""
    rng = _rng(seed, epoch, 0x5EED)
    shard_order = rng.permutation(len(shards))
    parts = []
    for w in range(0, len(shard_order), max(buffer_shards, 1)):
        window = np.concatenate([np.arange(shards[s].start, shards[s].stop) for s in shard_order[w:w + buffer_shards]])
        parts.append(window[rng.permutation(len(window))])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if valid is not None:
        order = order[valid[order].astype(bool)]
    return order.astype(np.int64)


def view_indices(images: np.ndarray, seed: int, epoch: int, views: int, mode: str) -> np.ndarray:
    """Which stored view each image uses in `epoch`: ``epoch mod V`` (cycle) or a seeded random view."""
    if mode == "cycle":
        return np.full(len(images), epoch % views, dtype=np.int64)
    if mode == "random":
        return _rng(seed, epoch, 0x71E3).integers(0, views, size=int(images.max(initial=-1)) + 1)[images]
    raise UserError(f"data.view_mode='{mode}': expected one of {', '.join(VIEW_MODES)}")


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch for one process: image and view indices per batch, and where
    each batch starts in the run's sample stream (which fixes its masks, `mask_noise`)."""

    images: np.ndarray  # (num_batches, batch_size)
    views: np.ndarray  # (num_batches, batch_size)
    first_samples: np.ndarray  # (num_batches,)

    def __len__(self) -> int:
        return len(self.images)


def plan_epoch(order: np.ndarray, views: np.ndarray, batch_size: int, num_processes: int = 1,
               process_index: int = 0, max_batches: Optional[int] = None, first_micro: int = 0) -> EpochPlan:
    """Cut the epoch order into global batches (drop the last partial one, keep at most
    `max_batches`, so an epoch holds whole accumulation cycles); keep this process' slice.
    `first_micro` is the run's micro-step count before this epoch."""
    global_batch = batch_size * num_processes
    n = len(order) // global_batch
    n = n if max_batches is None else min(n, max_batches)
    imgs = order[: n * global_batch].reshape(n, num_processes, batch_size)[:, process_index]
    vws = views[: n * global_batch].reshape(n, num_processes, batch_size)[:, process_index]
    starts = first_sample(np.arange(first_micro, first_micro + n, dtype=np.int64), batch_size, num_processes,
                          process_index)
    return EpochPlan(images=np.ascontiguousarray(imgs), views=np.ascontiguousarray(vws), first_samples=starts)


def batches_per_epoch(num_images: int, batch_size: int, num_processes: int = 1) -> int:
    return num_images // (batch_size * num_processes)


# ---------------------------------------------------------------- cached targets
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


def reader_shards(reader: TargetReader) -> list[range]:
    return [reader.shard_range(s) for s in range(reader.num_shards)]


class ShardBuffer:
    """The last few opened shards, so a batch costs no per-sample file reads.

    Targets stay in their stored dtypes (int8 feat + float16 steps, uint8 attention, float16
    or float32; see `codecs`): `get` returns them compact and `dequantize_targets` turns a
    batch into float32 on the compute device. Readers with ``open_shard`` (the cache stores)
    decode only the views a batch takes; other readers (`MemoryCache`) are read whole with
    ``read_shard``. Only the attention rows a run needs are returned (any k <= k_max is a prefix).
    """

    FIELDS = ("feat", "feat_mean", "feat_std", "attn", "topk_idx")

    def __init__(self, reader: TargetReader, capacity: int, attn_rows: int):
        self.reader, self.capacity, self.attn_rows = reader, max(capacity, 1), attn_rows
        shards = reader_shards(reader)
        self.shard_of = np.concatenate([np.full(len(r), s, dtype=np.int64) for s, r in enumerate(shards)])
        self.starts = np.asarray([r.start for r in shards], dtype=np.int64)
        self.buffer: OrderedDict[int, ShardTargets] = OrderedDict()
        self.decoded = 0  # shards opened so far (tests check chunk-awareness with it)

    def _shard(self, shard: int) -> ShardTargets:
        if shard in self.buffer:
            self.buffer.move_to_end(shard)
            return self.buffer[shard]
        opener = getattr(self.reader, "open_shard", None)
        kept = opener(shard) if opener is not None else ShardTargets(self.reader.read_shard(shard))
        self.buffer[shard] = kept
        self.decoded += 1
        while len(self.buffer) > self.capacity:
            self.buffer.popitem(last=False)
        return kept

    def get(self, images: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Targets and crop params of (image, view) pairs, stacked, in their stored dtypes:
        crop (B, 5), feat (B, L, C) [+ feat_step (B, C) for int8], feat_mean / feat_std (B, C),
        attn (B, rows, H, L), topk_idx (B, rows - 1)."""
        images, views = np.asarray(images, dtype=np.int64), np.asarray(views, dtype=np.int64)
        rows = self.attn_rows
        shards = self.shard_of[images]
        local = images - self.starts[shards]
        order = list(dict.fromkeys(shards.tolist()))  # shards in first-use order
        if len(order) == 1:
            return self._shard(order[0]).take(local, views, rows)
        out: Optional[dict[str, np.ndarray]] = None
        for shard in order:  # each shard writes its views straight into the batch arrays
            data = self._shard(shard)
            if out is None:
                out = {name: np.empty((len(images),) + shape, dtype) for name, (dtype, shape) in data.fields(rows).items()}
            sel = np.flatnonzero(shards == shard)
            data.take(local[sel], views[sel], rows, out, sel)
        return out


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


def open_image_source(kind: str, path: str) -> ImageSource:
    """An image source from `data.kind` / `data.path` (ImageFolder, webdataset tars, the demo set)."""
    from .data import open_source_at

    return open_source_at(kind, path)


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
    source = open_image_source(recorded.get("kind", "imagefolder"), path)
    if len(source) != reader.num_images:
        raise CacheMismatchError(f"data.path={path} holds {len(source)} images, the cache was made from {reader.num_images}")
    fingerprint = recorded.get("fingerprint")
    if fingerprint and source.fingerprint() != fingerprint:
        raise CacheMismatchError(f"data.path={path} is not the image set the cache was made from (file list differs)")
    return source


# ---------------------------------------------------------------- rendering and batches
def render_batch(source: ImageSource, images: np.ndarray, crops: np.ndarray, size: int) -> Tensor:
    """Render views (B, 3, size, size) uint8 from their source images and crop params (bit-identical)."""
    return torch.stack([render_view(source.load(int(i)), ViewParams.from_array(c), size) for i, c in zip(images, crops)])


class CachedBatches:
    """Batches from a cache: targets from the shard buffer in their stored dtypes (turn them into
    float32 with `batch_targets`), views re-rendered from the cached crops."""

    def __init__(self, reader: TargetReader, source: Optional[ImageSource], img_size: int, attn_rows: int,
                 buffer_shards: int, render: bool = True):
        self.reader, self.source, self.img_size, self.render = reader, source, img_size, render
        self.attn_rows, self.capacity = attn_rows, 2 * buffer_shards  # a batch can straddle two windows
        self.buffer: Optional[ShardBuffer] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "buffer": None}  # a loader worker opens its own shards

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        if self.buffer is None:  # built lazily: each loader worker keeps its own buffer
            self.buffer = ShardBuffer(self.reader, self.capacity, self.attn_rows)
        data = self.buffer.get(images, views)
        batch = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in data.items()}
        if self.render:
            batch["images"] = render_batch(self.source, images, data["crop"], self.img_size)
        return batch


class OnlineBatches:
    """Batches of rendered views only (online and pixel targets are computed on the batch)."""

    def __init__(self, source: ImageSource, img_size: int, seed: int, scale: tuple[float, float]):
        self.source, self.img_size, self.seed, self.scale = source, img_size, seed, scale

    def __call__(self, images: np.ndarray, views: np.ndarray) -> dict[str, Tensor]:
        pictures, crops = [], []
        for i, v in zip(images.tolist(), views.tolist()):
            picture = self.source.load(i)  # decoded once, for both the crop draw and the render
            width, height = picture.size
            crop = sample_view(self.seed, i, v, height, width, self.scale)
            pictures.append(render_view(picture, crop, self.img_size))
            crops.append(crop.as_array())
        return {"images": torch.stack(pictures), "crop": torch.from_numpy(np.stack(crops))}


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
        for b in range(self.start + worker, len(self.plan), workers):
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


def mask_noise(seed: int, first_sample: int, batch: int, num_patches: int) -> Tensor:
    """Uniform masking noise (B, L) on the CPU: row r from a generator seeded by
    (seed, first_sample + r), the sample's position in the run's stream of samples.

    The masks depend on nothing else, so a cached, an online and a resumed run mask alike, and
    so do 1 process x batch 2B, 1 process x batch B x 2 accumulation steps and 2 processes x
    batch B: the same effective batch gets the same masks however it is split.
    """
    rows = []
    for sample in range(first_sample, first_sample + batch):
        key = np.random.SeedSequence([seed, sample, 0x3A5C]).generate_state(1, np.uint64)[0]
        rows.append(torch.rand(num_patches, generator=torch.Generator().manual_seed(int(key >> np.uint64(1)))))
    return torch.stack(rows)


def first_sample(micro_step: int | np.ndarray, batch: int, num_processes: int = 1,
                 process_index: int = 0) -> int | np.ndarray:
    """Position of a micro-batch's first sample in the run's sample stream, as `plan_epoch`
    lays batches out: micro-batch j of process p holds samples j*B*P + p*B ... + B - 1."""
    return (micro_step * num_processes + process_index) * batch


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
    names = ShardBuffer.FIELDS + (("feat_step",) if "feat_step" in batch else ())
    return dequantize_targets(**{name: batch[name].to(device, non_blocking=True) for name in names})



# ---------------------------------------------------------------- an in-memory cache
class MemoryCache:
    """A complete cache held in memory with the `TargetReader` API (tests, benchmarks, small runs).

    `arrays` hold every field of `read_shard` for all images: crop (N, V, 5), feat (N, V, L, C), ...
    """

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta, self.arrays = meta, arrays
        self.num_images, self.views = int(meta["num_images"]), int(meta["views"])
        self.images_per_shard = int(meta["images_per_shard"])
        self.num_shards = -(-self.num_images // self.images_per_shard)
        self.reads = 0  # read_shard calls (tests check chunk-aware reading with it)

    def is_complete(self) -> bool:
        return True

    def shard_range(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.num_images))

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        self.reads += 1
        r = self.shard_range(shard)
        return {name: a[r.start:r.stop].copy() for name, a in self.arrays.items()}

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        return {name: (a[image, view] if a.ndim > 1 else a[image]) for name, a in self.arrays.items()}

    def image_bytes(self, image: int) -> Optional[bytes]:
        return None


@torch.no_grad()
def build_memory_cache(base, source: ImageSource, img_size: int, views: int, seed: int, k_max: int,
                       images_per_shard: int, last_layers: int = 2, scale: tuple[float, float] = (0.2, 1.0),
                       storage: str = "float32", batch_size: int = 16, source_path: str = "") -> MemoryCache:
    """Stage one in memory: every (image, view) rendered, base targets computed (`compute_targets`),
    stored in `storage` precision (float16 storage is rounded through float16)."""
    from .base_targets import compute_targets
    from .views import normalize

    pairs = [(i, v) for i in range(len(source)) for v in range(views)]
    fields: dict[str, list] = {k: [] for k in ("crop", "feat", "feat_mean", "feat_std", "attn", "topk_idx")}
    for s in range(0, len(pairs), batch_size):
        chunk, pictures = pairs[s:s + batch_size], []
        for i, v in chunk:
            picture = source.load(i)
            crop = sample_view(seed, i, v, picture.size[1], picture.size[0], scale)
            pictures.append(render_view(picture, crop, img_size))
            fields["crop"].append(crop.as_array())
        t = compute_targets(base, normalize(torch.stack(pictures)), last_layers, k_max)
        for name in ("feat", "feat_mean", "feat_std", "attn", "topk_idx"):
            fields[name].extend(getattr(t, name).cpu().numpy())
    n = len(source)
    arrays = {name: np.stack(v).reshape(n, views, *np.shape(v[0])) for name, v in fields.items()}
    for name in ("feat", "feat_mean", "feat_std", "attn"):
        arrays[name] = arrays[name].astype(storage).astype(np.float32)
    arrays["valid"] = np.ones(n, dtype=np.uint8)
    arrays["label"] = np.asarray([source.label(i) if hasattr(source, "label") else -1 for i in range(n)])
    L, C = arrays["feat"].shape[2:]
    meta = {"num_images": n, "views": views, "num_patches": L, "feat_dim": C, "heads": arrays["attn"].shape[3],
            "k_max": k_max, "images_per_shard": images_per_shard,
            "identity": {"img_size": img_size, "seed": seed, "last_layers": last_layers},
            "source": {"kind": "imagefolder", "path": source_path}}
    return MemoryCache(meta, arrays)
