"""Where a stage-two run's views and targets come from (``targets.source``: a cache, the base
model online, or pixels), and each step's float32 targets."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..base_targets import compute_targets
from ..cache.codecs import decode_batch
from ..cache.pq import PqCodec
from ..config import Config, TargetConfig, flatten, to_dict
from ..data import open_source_at
from ..errors import UserError
from ..models.base import build_vit, check_sizes, load_base_model
from ..cache_targets.drift import check_renderer
from ..data.sources import BadImageError
from ..pixels import pixel_targets
from ..render import ViewRenderer, open_renderer, render_files, resolve_loader
from ..rules import RULES
from ..targets import Targets, attention_rows
from .batches import CachedBatches, OnlineBatches
from .images import cache_image_source
from .interfaces import BatchMaker, TargetReader
from .order import uniform_shards
from .shards import reader_shards, valid_mask
from .spec import TargetSpec, base_spec, cache_spec, check_cache_base, pixel_spec


@dataclass
class DataPipeline:
    """Where a run's views and targets come from (``targets.source``: cache, online or pixels)."""

    source: str
    spec: TargetSpec
    shards: list[range]
    valid: Optional[np.ndarray]  # per-image flags of a cache (skipped images are 0); None: all valid
    views: int
    make_batch: BatchMaker
    base: Optional[torch.nn.Module] = None  # online: the base model in the loop
    meta: Optional[dict] = None  # the cache's metadata (cached runs)
    identity: Union[dict, str, None] = None  # what the data is: the cache's identity, else the images' fingerprint
    loader: str = "pil"  # data.loader resolved: who renders the views (`tec_pipeline.render`)
    name_of: Optional[Callable[[int], str]] = None  # image index -> its file, for errors
    renderer: Optional[ViewRenderer] = None  # data.loader=dali: renders on the step's device
    feat_codec: Optional[PqCodec] = None  # a pq cache's fitted parts: its codes are decoded with them

    @property
    def usable_images(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else sum(len(r) for r in self.shards)

    def images(self, batch: dict, device: torch.device) -> Tensor:
        """A batch's views (B, 3, S, S) uint8 on `device`: rendered by the loader workers, or here
        from the files they read (``data.loader=dali``, by the renderer `open_data` made for this
        device); an undecodable file is one line naming it."""
        if "images" in batch:
            return batch["images"].to(device, non_blocking=True)
        views, errors = render_files(self.renderer, batch, batch["crop"].numpy(), 1)
        for index, why in zip(batch["index"].tolist(), errors):
            if why:
                raise BadImageError(f"{self.name_of(index)}: {why}")
        return views


def patch_size(cfg: Config) -> int:
    """The new encoder's patch size: set in the config, or the timm architecture's default."""
    arch = cfg.model.arch
    return arch.patch_size or build_vit(replace(arch, img_size=cfg.data.img_size, depth=1)).patch_embed.patch_size[0]


def open_data(cfg: Config, render: bool = True, reader: Optional[TargetReader] = None,
              device: torch.device = torch.device("cpu")) -> DataPipeline:
    """Open the target source named by ``targets.source`` and the images its views are rendered from
    (by ``data.loader`` for the step's `device`).

    `reader` replaces opening ``cache.path`` (an already opened cache, e.g. in memory).
    """
    t, d = cfg.targets, cfg.data
    loader = resolve_loader(d.loader, device) if render else "pil"
    files_only = loader != "pil"
    renderer = open_renderer(loader, d.img_size, device, d.batch_size, d.num_workers) if files_only else None
    if t.source == "cache":
        if reader is None:
            from ..cache.storage import use_storage_options
            from ..cache.store import open_cache

            use_storage_options(cfg.cache.path, cfg.cache.storage_options)
            reader = open_cache(cfg.cache.path)
            damaged = sorted(reader.damaged_shards().items())  # one listing: refused now, not hours into the run
            if damaged:
                shard, why = damaged[0]
                raise UserError(f"cache.path={cfg.cache.path}: shard {shard}: {why}; rerun cache-targets with the "
                                f"same config to write it again")
        if not reader.is_complete():
            raise UserError(f"cache.path={cfg.cache.path}: the cache is incomplete (finish stage one first)")
        source = cache_image_source(reader, d.path) if render else None
        make = CachedBatches(reader, source, d.img_size, attention_rows(t.attention, t.k), d.buffer_shards, render,
                             files_only)
        check_cache_base(reader.meta, cfg.base.checkpoint)
        if render:
            check_renderer(reader.meta, reader.summary, loader)
        return DataPipeline("cache", cache_spec(reader.meta), reader_shards(reader), valid_mask(reader),
                            reader.views, make, meta=reader.meta, identity=reader.meta.get("identity"),
                            loader=loader, name_of=source.name if source is not None else None, renderer=renderer,
                            feat_codec=reader.feat_codec)
    source = open_source_at(d.kind, d.path)
    shards = uniform_shards(len(source), cfg.cache.images_per_shard)  # same order as a cache of this config
    make = OnlineBatches(source, d.img_size, cfg.seed, (d.scale_min, d.scale_max), files_only)
    if t.source == "online":
        check_sizes(flatten(to_dict(cfg)), "base.arch", RULES)  # base sizes left to timm's defaults, resolved
        base = load_base_model(cfg.base.arch, cfg.base.checkpoint, img_size=d.img_size)
        return DataPipeline("online", base_spec(base, d.img_size), shards, None, d.views, make, base,
                            identity=source.fingerprint(), loader=loader, name_of=source.name, renderer=renderer)
    return DataPipeline("pixels", pixel_spec(d.img_size, patch_size(cfg)), shards, None, d.views, make,
                        identity=source.fingerprint(), loader=loader, name_of=source.name, renderer=renderer)


def step_targets(data: DataPipeline, batch: dict, images: Tensor, t: TargetConfig, patch: int,
                 autocast: ContextManager = nullcontext()) -> Targets:
    """One micro-batch's float32 targets on the images' device: dequantized from the cache, computed
    by the base model (under the run's `autocast`), or the patch-normalized pixels of `images`."""
    if data.source == "cache":
        return decode_batch(batch, images.device, data.feat_codec)
    if data.source == "online":
        with torch.no_grad(), autocast:
            return compute_targets(data.base, images, t.last_layers, attention_rows(t.attention, t.k) - 1)
    return pixel_targets(images, patch)
