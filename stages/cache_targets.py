"""Stage one, `tec-pipeline cache-targets`: run the frozen base model once over V views of
every image and write the enhanced targets (Sec. 2.3) with each view's crop to a cache.

The driver only: sources and the view DataLoader are `tec_pipeline.data`, the base forward and
its enhancement (Eq. 2, top-k) `tec_pipeline.base_targets`, the storage encoding
`tec_pipeline.cache.encode`, shard assembly and the writer pool `tec_pipeline.cache.assemble`,
storage `tec_pipeline.cache.store`, and settings, processes, reports and the loop over a
process's shards (`loop.compute_shards`) `tec_pipeline.cache_targets`. What it adds is their
order:

- DataLoader workers decode and render (``data.loader=pil``), or read the files only and the
  views are rendered on the compute device (``dali``); the main thread runs batched base forwards under
  `inference_mode` in `base.compute_dtype` (auto: fp16 autocast on CUDA, fp32 on CPU) and
  encodes the targets to their storage dtypes on the same device; a pool of
  `cache.writer_threads` threads compresses and writes whole shards, so compute and storage
  overlap.
- Under `accelerate launch` each process takes a contiguous range of shards; rank 0 creates
  the cache (with `cache.feat_dtype=pq`, fits its parts on views spread over the source:
  `cache_targets.pq_fit`) and finalizes it once every process is done.
- More views asked of a complete cache (a larger ``data.views``, every other setting the same)
  add the missing ones as a view part beside it (`tec_pipeline.cache.growth`): the cache's own
  files are not touched, and the views added are those a cache made with them all holds.
- A rerun skips completed shards; batches never straddle shards, so a resumed run feeds the
  base model exactly the batches of an uninterrupted one and writes the same arrays.
"""
from __future__ import annotations

import time
from functools import partial

from tec_pipeline.stages.dry_run import dry_run_estimate
from tec_pipeline.base_targets import compute_dtype, compute_setting, load_base, view_targets
from tec_pipeline.cache.storage import use_storage_options
from tec_pipeline.cache.store import find_growth
from tec_pipeline.config import Config
from tec_pipeline.data import open_source
from tec_pipeline.cache_targets.view_dataset import BatchViews, ViewDataset
from tec_pipeline.render import open_renderer, resolve_loader
from tec_pipeline.cache_targets.drift import drift_to_others
from tec_pipeline.cache_targets.loop import compute_shards
from tec_pipeline.cache_targets.processes import gather, open_for_writing, process_state, split_pending
from tec_pipeline.cache_targets.pq_fit import feat_codec
from tec_pipeline.cache_targets.settings import cache_meta, check_base, check_settings, images_per_batch
from tec_pipeline.cache_targets.summary import (finish_cache, finish_growth, merge_summaries, print_repairs,
                                               print_summary)


def run_cache_targets(cfg: Config, overwrite: bool = False, dry_run: bool = False) -> dict:
    """Stage one. Returns the run summary (images, views, skipped, bytes, wall time), or with
    `dry_run` the estimate of `tec_pipeline.stages.dry_run` (nothing written)."""
    start = time.perf_counter()
    check_settings(cfg)
    use_storage_options(cfg.cache.path, cfg.cache.storage_options)
    state = process_state()
    source = open_source(cfg.data)
    base = load_base(cfg.base.arch, cfg.base.checkpoint, cfg.data.img_size, cfg.seed)
    check_base(cfg, base)
    device = state.device
    base.to(device)
    precision = compute_setting(cfg.base.compute_dtype, device)
    loader = resolve_loader(cfg.data.loader, device)
    meta = cache_meta(cfg, source, base, precision, loader)
    growth = find_growth(cfg.cache.path, meta, overwrite)  # more views asked of a complete cache: a view part
    url, meta = (growth.url, growth.meta) if growth else (cfg.cache.path, meta)
    dataset, views_of = view_inputs(cfg, source, meta, loader, device)
    forward = partial(view_targets, base, last_layers=cfg.targets.last_layers, k_max=cfg.cache.k_max,
                      device=device, dtype=compute_dtype(precision))
    if dry_run:
        return dry_run_estimate(cfg, meta, dataset, views_of, forward, state)
    with open_for_writing(url, meta, overwrite, state) as writer:  # rank 0 holds the cache's lock
        writer.direct_io = cfg.cache.direct_io
        print_repairs(writer.repaired, url)
        # a pq cache's parts, recorded before any shard: a view part takes the cache's own
        feat_codec(cfg, writer, dataset, views_of, forward, state, grows=cfg.cache.path if growth else None)
        pending, mine = split_pending(writer, state)
        local = compute_shards(cfg, writer, dataset, forward, mine, state, views_of)
        state.wait_for_everyone()
        summary = merge_summaries(gather(local, state), meta, time.perf_counter() - start)
        if state.is_main_process:
            if pending and not growth:  # the drift to the other renderers, which decides whether training may use them
                summary["renderer_drift"] = drift_to_others(base, device, source, meta)
            summary = finish_cache(url, writer, summary, len(pending), source)
            if growth:
                summary["lineage"] = finish_growth(cfg.cache.path, growth)
            print_summary(summary, url)
        state.wait_for_everyone()
    return summary


def view_inputs(cfg: Config, source, meta: dict, loader: str, device) -> tuple[ViewDataset, BatchViews]:
    """The views the cache (or its view part, from ``meta["first_view"]`` on) holds, and who renders
    them: ``meta["views"]`` per image; the source images kept only where the metadata stores them."""
    views = int(meta["views"])
    dataset = ViewDataset(source, cfg.seed, views, cfg.data.img_size, (cfg.data.scale_min, cfg.data.scale_max),
                          keep_raw=bool(meta["store_images"]), files_only=loader != "pil", first_view=int(meta.get("first_view", 0)))
    renderer = open_renderer(loader, cfg.data.img_size, device, images_per_batch(cfg) * views, cfg.data.num_workers)
    return dataset, BatchViews(renderer, views, source.name)
