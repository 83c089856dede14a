"""Stage one's fit of a pq cache's parts (``cache.feat_dtype=pq``; the codec is ``cache.pq``).

The parts are fitted once per cache, before any shard is written, on the base's features of up
to ``pq.FIT_VIEWS`` views: all views of images evenly spread over the whole source (`fit_images`),
computed by the same forward as the shards'. Not the first shard's images alone: an ImageFolder
lists its images class by class, so its first shard would often hold one class (the demo's first
256 digits are all zeros, an ImageNet shard one synset). Process 0 fits them,
stores them and records their digest in the cache's identity (``CacheWriter.record_feat_codec``);
the other processes wait, then read them. A rerun over a cache that recorded its parts reuses
them, so every shard of a cache, whichever run or process wrote it, is encoded with the same
parts.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..cache.pq import FIT_SEED, FIT_VIEWS, PqCodec, fit_pq
from ..cache.store import open_cache
from ..config import Config
from .view_dataset import BatchViews, ViewDataset, view_loader
from ..errors import UserError
from .processes import on_main
from .settings import images_per_batch


def fit_images(num_images: int, views: int, limit: int = FIT_VIEWS) -> list[int]:
    """The images whose views the parts are fitted on: ``ceil(limit / views)`` of the source's
    `num_images` (all of them when it holds fewer), evenly spread over it."""
    count = min(num_images, -(-limit // views))
    return np.unique(np.linspace(0, num_images - 1, count).round().astype(np.int64)).tolist()


def fit_features(cfg: Config, dataset: ViewDataset, views_of: BatchViews, forward, images: list[int]) -> Tensor:
    """float32 Yf (N, L, C) on the CPU of every view of the decodable ones of `images`, rendered as
    the shards' are (`views_of`), from `forward` (stage one's base forward: uint8 views -> targets
    on the compute device)."""
    step = images_per_batch(cfg)
    batches = [images[i:i + step] for i in range(0, len(images), step)]
    feats = []
    for batch in view_loader(dataset, batches, cfg.data.num_workers):
        feat = forward(views_of(batch))["feat"]  # (B, V, L, C)
        feats.append(feat[batch["valid"].to(feat.device)].flatten(0, 1).float().cpu())
    feat = torch.cat(feats)
    if not len(feat):
        raise UserError(f"cache.feat_dtype=pq: none of the {len(images)} images the parts are fitted on could be "
                        f"decoded (data.path={cfg.data.path})")
    return feat


def feat_codec(cfg: Config, writer, dataset: ViewDataset, views_of: BatchViews, forward, state,
               grows: Optional[str] = None) -> Optional[PqCodec]:
    """The cache's pq parts for this run (None unless ``cache.feat_dtype=pq``): the recorded ones
    where the cache has them, else fitted by process 0 (seed ``pq.FIT_SEED``) and recorded before
    any shard is written; the other processes then read them. A view part of the complete cache
    `grows` records that cache's parts instead: the added views' codes mean what the first views'
    mean, and nothing is fitted again."""
    if writer.meta["feat_dtype"] != "pq":
        return None

    def fit_and_record() -> None:
        if writer.feat_codec is None:
            codec = open_cache(grows).feat_codec if grows else fit_pq(
                fit_features(cfg, dataset, views_of, forward, fit_images(len(dataset), cfg.data.views)),
                cfg.cache.pq_subvectors, FIT_SEED)
            writer.record_feat_codec(codec)

    on_main(fit_and_record, state)
    return writer.feat_codec if state.is_main_process else writer.load_feat_codec()
