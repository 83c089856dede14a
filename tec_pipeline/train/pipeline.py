"""What a stage-two run trains on: its targets (cache, online base model or pixels), the images
its views come from, and the new model's arguments, all from the run's config."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import ContextManager, Optional

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import Tensor

from ..base_targets import compute_targets
from ..config import Config, TargetConfig, ViTArch
from ..data import open_source_at
from ..errors import UserError
from ..export import build_model
from ..models.base import build_vit, load_base_model
from ..pixels import pixel_targets
from ..targets import Targets, attention_rows
from .batches import (CachedBatches, OnlineBatches, TargetReader, batch_targets, cache_image_source, reader_shards,
                      valid_mask)
from .checkpoint import init_from_base, init_from_checkpoint
from .order import uniform_shards
from .spec import TargetSpec, base_spec, cache_spec, check_cache_base, check_request, pixel_spec


@dataclass
class DataPipeline:
    """Where a run's views and targets come from (``targets.source``: cache, online or pixels)."""

    source: str
    spec: TargetSpec
    shards: list[range]
    valid: Optional[np.ndarray]  # per-image flags of a cache (skipped images are 0); None: all valid
    views: int
    make_batch: object  # (images, views) -> batch dict: `CachedBatches` or `OnlineBatches`
    base: Optional[torch.nn.Module] = None  # online: the base model in the loop
    meta: Optional[dict] = None  # the cache's metadata (cached runs)
    identity: object = None  # what the data is: the cache's identity, else the image folder's fingerprint

    @property
    def usable_images(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else sum(len(r) for r in self.shards)


def open_data(cfg: Config, render: bool = True, reader: Optional[TargetReader] = None) -> DataPipeline:
    """Open the target source named by ``targets.source`` and the images its views are rendered from.

    `reader` replaces opening ``cache.path`` (an already opened cache, e.g. in memory).
    """
    t, d = cfg.targets, cfg.data
    if t.source == "cache" and d.view_mode == "fresh":
        raise UserError("data.view_mode=fresh draws a new crop every epoch, which a cache of fixed views cannot "
                        "serve; use targets.source=online or pixels, or data.view_mode=cycle or random")
    if t.source == "cache":
        if reader is None:
            from ..cache.storage import use_storage_options
            from ..cache.store import open_cache

            use_storage_options(cfg.cache.path, cfg.cache.storage_options)
            reader = open_cache(cfg.cache.path)
        if not reader.is_complete():
            raise UserError(f"cache.path={cfg.cache.path}: the cache is incomplete (finish stage one first)")
        source = cache_image_source(reader, d.path) if render else None
        make = CachedBatches(reader, source, d.img_size, attention_rows(t.attention, t.k), d.buffer_shards, render)
        check_cache_base(reader.meta, cfg.base.checkpoint)
        return DataPipeline("cache", cache_spec(reader.meta), reader_shards(reader), valid_mask(reader),
                            reader.views, make, meta=reader.meta, identity=reader.meta.get("identity"))
    source = open_source_at(d.kind, d.path)
    shards = uniform_shards(len(source), cfg.cache.images_per_shard)  # same order as a cache of this config
    make = OnlineBatches(source, d.img_size, cfg.seed, (d.scale_min, d.scale_max))
    if t.source == "online":
        base = load_base_model(cfg.base.arch, cfg.base.checkpoint, img_size=d.img_size)
        return DataPipeline("online", base_spec(base, d.img_size), shards, None, d.views, make, base,
                            identity=source.fingerprint())
    return DataPipeline("pixels", pixel_spec(d.img_size, patch_size(cfg)), shards, None, d.views, make,
                        identity=source.fingerprint())


def base_arch(cfg: Config, meta: Optional[dict]) -> ViTArch:
    """The base's architecture: the one a cache recorded it was made with, else the config's."""
    recorded = ((meta or {}).get("base") or {}).get("arch")
    return ViTArch(**recorded) if recorded else cfg.base.arch


def patch_size(cfg: Config) -> int:
    """The new encoder's patch size: set in the config, or the timm architecture's default."""
    arch = cfg.model.arch
    return arch.patch_size or build_vit(replace(arch, img_size=cfg.data.img_size, depth=1)).patch_embed.patch_size[0]


def effective_targets(cfg: Config) -> TargetConfig:
    """The target settings a run uses: pixels (MAE) have no attention target and no norm choice."""
    if cfg.targets.source == "pixels":
        return replace(cfg.targets, attention="none", norm="patch")
    return cfg.targets


def step_targets(data: DataPipeline, batch: dict, images: Tensor, t: TargetConfig, patch: int,
                 autocast: ContextManager = nullcontext()) -> Targets:
    """One micro-batch's float32 targets on the images' device: dequantized from the cache, computed
    by the base model (under the run's `autocast`), or the patch-normalized pixels of `images`."""
    if data.source == "cache":
        return batch_targets(batch, images.device)
    if data.source == "online":
        with torch.no_grad(), autocast:
            return compute_targets(data.base, images, t.last_layers, attention_rows(t.attention, t.k) - 1)
    return pixel_targets(images, patch)


def model_kwargs(cfg: Config, spec: TargetSpec) -> dict:
    """`TECModel` arguments for this run; stored in every checkpoint so export can rebuild it."""
    m, t = cfg.model, effective_targets(cfg)
    if m.arch.img_size is not None and m.arch.img_size != cfg.data.img_size:
        raise UserError(f"model.arch.img_size={m.arch.img_size} differs from data.img_size={cfg.data.img_size}")
    pixels = cfg.targets.source == "pixels"
    attn = t.attention != "none"
    return {
        "arch": asdict(replace(m.arch, img_size=cfg.data.img_size)),
        "feat_dim": spec.feat_dim,
        "attn_dim": spec.feat_dim if attn else 0,
        "attn_heads": spec.heads if attn else 0,
        "input_adapter": m.input_adapter and not pixels,  # MAE has no adapters
        "encoder_adapter": m.encoder_adapter and not pixels,
        "adapter_group": m.adapter_group,
        "decoder_dim": m.decoder_dim,
        "decoder_depth": m.decoder_depth,
        "decoder_heads": m.decoder_heads,
        "adapter_norm_eps": m.adapter_norm_eps,
        "patch_bias_init": m.patch_bias_init,
    }


def new_model(cfg: Config, data: DataPipeline):
    """The new model at its first step, checked against what the targets can serve, and its
    `model_kwargs`: freshly initialised (seeded right before, so whatever ran earlier, a base
    model build, cannot shift it), then Tab. 6d's base encoder and/or another run's weights."""
    t, kwargs = effective_targets(cfg), model_kwargs(cfg, data.spec)
    set_seed(cfg.seed)
    model = build_model(kwargs)
    check_request(data.spec, img_size=cfg.data.img_size, num_patches=model.encoder.patch_embed.num_patches,
                  k=t.k, attention=t.attention, what="the cache" if data.source == "cache" else "the base model")
    if cfg.model.init_from_base:
        # a cached run may name no base: the cache records the checkpoint it was made with
        checkpoint = cfg.base.checkpoint or ((data.meta or {}).get("base") or {}).get("checkpoint")
        if not checkpoint:
            raise UserError("model.init_from_base=true needs base.checkpoint (the base model's weights)")
        base = data.base or load_base_model(base_arch(cfg, data.meta), checkpoint, img_size=cfg.data.img_size)
        init_from_base(model, base, checkpoint)
    if cfg.model.init_checkpoint:
        init_from_checkpoint(model, cfg.model.init_checkpoint)
    return model, kwargs
