"""Where a stage-two run's views and targets come from (``targets.source``: a cache, the base
model online, or pixels), opened once from the config: what the targets can serve (`TargetSpec`,
and the refusal, before training, of a request they cannot serve), the batch maker its loader
workers run, and the two functions each step calls on a batch, chosen when the data is opened:
its views on the step's device, and its float32 targets."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..base_targets import autocast, compute_targets
from ..cache.codecs import decode_batch
from ..cache.fidelity import INT8_FEAT_REL_RMS, UINT8_ATTN_KL
from ..cache.pq import PqCodec
from ..cache.schema import CacheMismatchError  # the one error for a cache that cannot serve a request
from ..config import Config, TargetConfig
from ..data import open_source_at
from ..data.sources import BadImageError
from ..errors import UserError
from ..models.base import build_vit, file_sha256, load_base_model
from ..pixels import pixel_feat_dim, pixel_targets
from ..render import ViewRenderer, cache_loader, open_renderer, render_files, resolve_loader
from ..targets import Targets, attention_rows
from .batches import BatchMaker, CachedBatches, OnlineBatches, TargetReader, cache_image_source, reader_shards, valid_mask
from .loader import uniform_shards


# ---------------------------------------------------------------- what the targets can serve
@dataclass(frozen=True)
class TargetSpec:
    """Shape of the targets a run trains on."""

    img_size: int
    num_patches: int
    feat_dim: int  # C_base (or p*p*3 for pixels)
    heads: int  # H_base (0: no attention target)
    k_max: int  # attention rows available beyond the cls row


def cache_spec(meta: dict) -> TargetSpec:
    """The `TargetSpec` recorded in a cache's metadata."""
    return TargetSpec(img_size=int(meta["img_size"]), num_patches=int(meta["num_patches"]),
                      feat_dim=int(meta["feat_dim"]), heads=int(meta["heads"]), k_max=int(meta["k_max"]))


def base_spec(base, img_size: int) -> TargetSpec:
    """The `TargetSpec` of a base model computing targets online (any k up to L is available)."""
    L = base.patch_embed.num_patches
    return TargetSpec(img_size=img_size, num_patches=L, feat_dim=base.embed_dim,
                      heads=base.blocks[-1].attn.num_heads, k_max=L)


def pixel_spec(img_size: int, patch: int) -> TargetSpec:
    """The `TargetSpec` of MAE's pixel target: p*p*3 channels per patch, no attention target."""
    return TargetSpec(img_size, (img_size // patch) ** 2, pixel_feat_dim(patch), heads=0, k_max=0)


def check_request(spec: TargetSpec, *, img_size: int, num_patches: int, k: int, attention: str,
                  what: str = "the cache") -> None:
    """Refuse, before training, a request the targets cannot serve.

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
    if not Path(checkpoint).is_file():
        raise CacheMismatchError(f"base.checkpoint={checkpoint}: file not found (training from a cache needs no base; "
                                 "leave base.checkpoint empty or point it at the cache's base)")
    if file_sha256(checkpoint) != recorded:
        raise CacheMismatchError(f"base.checkpoint={checkpoint} is not the base model the cache was made with "
                                 f"(SHA-256 differs)")


def check_renderer(meta: dict, summary: dict, loader: str) -> None:
    """Stage two renders with `loader` (``data.loader`` resolved): the cache's own renderer, or
    another whose recorded drift is below int8's own error (one line says so); else refused in
    one line naming ``data.loader``."""
    made = cache_loader(meta)
    if loader == made:
        return
    drift = (summary.get("renderer_drift") or {}).get(loader)
    if not drift:
        raise UserError(f"data.loader={loader}: the cache's views were rendered with {made}, and how far {loader} "
                        f"moves their targets was not measured when it was made; set data.loader={made}")
    moved = f"feature rel RMS {drift['feat_rel_rms']:.2%}, attention KL {drift['attn_kl']:.1e}"
    bound = f"int8's own {INT8_FEAT_REL_RMS:.2%} / {UINT8_ATTN_KL:.1e}"
    if drift["feat_rel_rms"] > INT8_FEAT_REL_RMS or drift["attn_kl"] > UINT8_ATTN_KL:
        raise UserError(f"data.loader={loader}: the cache was rendered with {made}, and {loader} moves its targets "
                        f"by {moved}, above {bound}; set data.loader={made}")
    print(f"data.loader={loader}: the cache was rendered with {made}; {loader} moves its targets by {moved}, "
          f"below {bound}: training renders with {loader}")


# ---------------------------------------------------------------- a run's data
@dataclass(frozen=True)
class TrainData:
    """A run's data, opened once: what its targets can serve, its shards and views, the batch
    maker its loader workers run, and what each step does with a batch (`views_of`, `targets_of`)."""

    source: str  # targets.source: "cache", "online" or "pixels"
    spec: TargetSpec
    shards: list[range]  # image ranges, in the layout of a cache of this config
    valid: Optional[np.ndarray]  # per-image flags of a cache (skipped images are 0); None: all valid
    views: int  # V: views per image
    make_batch: BatchMaker  # (images, views) -> batch, in the loader workers
    views_of: Callable[[dict], Tensor]  # batch -> (B, 3, S, S) uint8 views on the step's device
    targets_of: Callable[[dict, Tensor], Targets]  # (batch, normalized views) -> float32 targets on their device
    identity: Union[dict, str, None]  # what the data is: the cache's identity, else the images' fingerprint
    loader: str  # data.loader resolved: who renders the views (`tec_pipeline.render`)
    meta: Optional[dict] = None  # the cache's metadata (cached runs)
    base: Optional[torch.nn.Module] = None  # online: the base model in the loop

    @property
    def usable_images(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else sum(len(r) for r in self.shards)


def patch_size(cfg: Config) -> int:
    """The new encoder's patch size: set in the config, or the timm architecture's default."""
    arch = cfg.model.arch
    return arch.patch_size or build_vit(replace(arch, img_size=cfg.data.img_size, depth=1)).patch_embed.patch_size[0]


def open_data(cfg: Config, render: bool = True, reader: Optional[TargetReader] = None,
              device: torch.device = torch.device("cpu"), precision: Optional[torch.dtype] = None) -> TrainData:
    """Open the target source named by ``targets.source`` and the images its views are rendered from
    (by ``data.loader`` for the step's `device`); online targets are computed under autocast to
    `precision` (the run's, None: float32).

    `reader` replaces opening ``cache.path`` (an already opened cache, e.g. in memory).
    """
    t, d = cfg.targets, cfg.data
    loader = resolve_loader(d.loader, device) if render else "pil"
    files_only = loader != "pil"
    renderer = open_renderer(loader, d.img_size, device, d.batch_size, d.num_workers) if files_only else None
    if t.source == "cache":
        reader = reader if reader is not None else open_training_cache(cfg.cache.path, cfg.cache.storage_options)
        if not reader.is_complete():
            raise UserError(f"cache.path={cfg.cache.path}: the cache is incomplete (finish stage one first)")
        source = cache_image_source(reader, d.path) if render else None
        make = CachedBatches(reader, source, d.img_size, attention_rows(t.attention, t.k), d.buffer_shards, render,
                             files_only)
        check_cache_base(reader.meta, cfg.base.checkpoint)
        if render:
            check_renderer(reader.meta, reader.summary, loader)
        return TrainData("cache", cache_spec(reader.meta), reader_shards(reader), valid_mask(reader), reader.views,
                         make, step_views(renderer, source.name if source is not None else None, device),
                         partial(cached_targets, reader.feat_codec), reader.meta.get("identity"), loader,
                         meta=reader.meta)
    source = open_source_at(d.kind, d.path)
    shards = uniform_shards(len(source), cfg.cache.images_per_shard)  # same order as a cache of this config
    make = OnlineBatches(source, d.img_size, cfg.seed, (d.scale_min, d.scale_max), files_only)
    views_of = step_views(renderer, source.name, device)
    if t.source == "online":
        base = load_base_model(cfg.base.arch, cfg.base.checkpoint, img_size=d.img_size)
        return TrainData("online", base_spec(base, d.img_size), shards, None, d.views, make, views_of,
                         partial(online_targets, base, t, precision), source.fingerprint(), loader, base=base)
    patch = patch_size(cfg)
    return TrainData("pixels", pixel_spec(d.img_size, patch), shards, None, d.views, make, views_of,
                     partial(patch_targets, patch), source.fingerprint(), loader)


def open_training_cache(url: str, storage_options: Optional[dict]) -> TargetReader:
    """The cache at `url`, its damaged shards refused now in one line, not hours into the run."""
    from ..cache.storage import use_storage_options
    from ..cache.store import open_cache

    use_storage_options(url, storage_options)
    reader = open_cache(url)
    damaged = sorted(reader.damaged_shards().items())
    if damaged:
        shard, why = damaged[0]
        raise UserError(f"cache.path={url}: shard {shard}: {why}; rerun cache-targets with the same config to write "
                        f"it again")
    return reader


# ---------------------------------------------------------------- each step's views and targets
def step_views(renderer: Optional[ViewRenderer], name_of: Optional[Callable[[int], str]],
               device: torch.device) -> Callable[[dict], Tensor]:
    """A batch's views (B, 3, S, S) uint8 on `device`: rendered by the loader workers (moved
    here), or here from the files they read (``data.loader=dali``, by `renderer`)."""
    return partial(rendered_views, renderer, name_of) if renderer is not None else partial(moved_views, device)


def moved_views(device: torch.device, batch: dict) -> Tensor:
    return batch["images"].to(device, non_blocking=True)


def rendered_views(renderer: ViewRenderer, name_of: Callable[[int], str], batch: dict) -> Tensor:
    """The batch's views rendered on the renderer's device; an undecodable file is one line naming it."""
    views, errors = render_files(renderer, batch, batch["crop"].numpy(), 1)
    for index, why in zip(batch["index"].tolist(), errors):
        if why:
            raise BadImageError(f"{name_of(index)}: {why}")
    return views


def cached_targets(codec: Optional[PqCodec], batch: dict, images: Tensor) -> Targets:
    """The batch's cached targets dequantized to float32 on the images' device."""
    return decode_batch(batch, images.device, codec)


def online_targets(base: torch.nn.Module, t: TargetConfig, precision: Optional[torch.dtype], batch: dict,
                   images: Tensor) -> Targets:
    """The base model's targets of the normalized `images`, computed in the step (under autocast to `precision`)."""
    with torch.no_grad(), autocast(images.device, precision):
        return compute_targets(base, images, t.last_layers, attention_rows(t.attention, t.k) - 1)


def patch_targets(patch: int, batch: dict, images: Tensor) -> Targets:
    """MAE's target: the patch-normalized pixels of the normalized `images`."""
    return pixel_targets(images, patch)
