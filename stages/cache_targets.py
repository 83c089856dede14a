"""Stage one, `tec-pipeline cache-targets`: run the frozen base model once over V views of
every image and write the enhanced targets (Sec. 2.3) with each view's crop to a cache.

The driver only: sources and the view DataLoader are `tec_pipeline.data`, the base forward and
its enhancement (Eq. 2, top-k) `tec_pipeline.base_targets`, the storage encoding
`tec_pipeline.cache.encode`, shard assembly and the writer pool `tec_pipeline.cache.assemble`,
storage `tec_pipeline.cache.store`, and settings, processes and reports
`tec_pipeline.cache_targets`. What it adds is the loop around them:

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
from typing import Callable, Optional

from torch import Tensor

from tec_pipeline.stages.dry_run import dry_run_estimate
from tec_pipeline.base_targets import compute_dtype, compute_setting, load_base, view_targets
from tec_pipeline.cache.assemble import ShardAssembler, ShardWriterPool, default_writer_threads
from tec_pipeline.cache.encode import NonFiniteTargetError
from tec_pipeline.cache.storage import use_storage_options
from tec_pipeline.cache.store import find_growth
from tec_pipeline.config import Config
from tec_pipeline.data import open_source
from tec_pipeline.data.view_dataset import BatchViews, ViewDataset, shard_batches, view_loader
from tec_pipeline.render import open_renderer, resolve_loader
from tec_pipeline.cache_targets.drift import drift_to_others
from tec_pipeline.cache_targets.growth import adopt_parts, finish_growth
from tec_pipeline.cache_targets.processes import gather, on_main, open_for_writing, process_state, split_pending
from tec_pipeline.cache_targets.pq_fit import feat_codec
from tec_pipeline.cache_targets.settings import (
    cache_meta, check_base, check_settings, images_per_batch, non_finite_error,
)
from tec_pipeline.cache_targets.summary import (
    check_bad_images, finish_cache, merge_summaries, print_repairs, print_summary, progress_bar, progress_text,
)

Forward = Callable[[Tensor], dict[str, Tensor]]  # uint8 views (B, V, 3, S, S) -> targets on the device


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
    dataset, views_of = view_inputs(cfg, source, meta, loader, device, growth.first if growth else 0)
    forward = partial(view_targets, base, last_layers=cfg.targets.last_layers, k_max=cfg.cache.k_max,
                      device=device, dtype=compute_dtype(precision))
    if dry_run:
        return dry_run_estimate(cfg, meta, dataset, views_of, forward, state)
    with open_for_writing(url, meta, overwrite, state) as writer:  # rank 0 holds the cache's lock
        writer.direct_io = cfg.cache.direct_io
        print_repairs(writer.repaired, url)
        if growth:
            on_main(lambda: adopt_parts(writer, cfg.cache.path), state)  # pq: the parts the cache fitted once
        feat_codec(cfg, writer, dataset, views_of, forward, state)  # a pq cache's parts: recorded before any shard
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


def view_inputs(cfg: Config, source, meta: dict, loader: str, device, first_view: int) -> tuple[ViewDataset, BatchViews]:
    """The views the cache (or its view part, from `first_view` on) holds, and who renders them:
    ``meta["views"]`` per image; the source images kept only where the metadata stores them."""
    views = int(meta["views"])
    dataset = ViewDataset(source, cfg.seed, views, cfg.data.img_size, (cfg.data.scale_min, cfg.data.scale_max),
                          keep_raw=bool(meta["store_images"]), files_only=loader != "pil", first_view=first_view)
    renderer = open_renderer(loader, cfg.data.img_size, device, images_per_batch(cfg) * views, cfg.data.num_workers)
    return dataset, BatchViews(renderer, views, source.name)


def compute_shards(cfg: Config, writer, dataset: ViewDataset, forward: Forward, shards: list[int], state,
                   views_of: Optional[BatchViews] = None) -> dict:
    """Compute and write `shards` (this process's pending ones); returns this run's counts.

    `views_of` gives a batch's views (rendered on the device for ``data.loader=dali``); by default
    the loader workers rendered them.
    `forward` gives a batch's targets on the compute device; they are encoded there
    (`ShardAssembler.add`) and whole shards go to a pool of `cache.writer_threads` writers. A
    non-finite target stops the run naming `base.compute_dtype`; its shard is never queued."""
    ranges = [writer.shard_range(s) for s in shards]
    loader = view_loader(dataset, shard_batches(ranges, images_per_batch(cfg)), cfg.data.num_workers,
                         pin_memory=state.device.type == "cuda")
    bar = progress_bar(sum(len(r) for r in ranges), state)
    out = ShardWriterPool(writer, cfg.cache.writer_threads or default_writer_threads())
    start = time.perf_counter()
    try:
        views_of = views_of or BatchViews(None, dataset.views, dataset.source.name)
        images, skipped = assemble_shards(cfg, writer, loader, views_of, forward, out, bar)
        out.close()
    except NonFiniteTargetError as err:
        raise non_finite_error(err, writer.meta) from None
    finally:
        bar.close()
        out.stop()  # on an error: let the shards already queued (complete ones) finish writing
    for item in skipped:
        item["name"] = dataset.source.name(item["index"])
    return {"images": images, "views": images * dataset.views, "bytes": out.bytes_written, "skipped": skipped,
            "write_seconds": out.seconds, "shards": len(shards), "loop_seconds": time.perf_counter() - start}


def assemble_shards(cfg: Config, writer, loader, views_of: BatchViews, forward: Forward, out: ShardWriterPool,
                    bar) -> tuple[int, list]:
    """The loop: each batch's targets encoded into its shard, a full shard to the writers.
    Returns the images done and the skipped ones."""
    assembling: dict[int, ShardAssembler] = {}  # shard -> its arrays so far
    images, skipped, start = 0, [], time.perf_counter()
    for batch in loader:  # B images of one shard
        views = views_of(batch)  # (B, V, 3, S, S) uint8
        check_bad_images(batch, cfg.data.on_bad_image)
        shard = int(batch["index"][0]) // cfg.cache.images_per_shard
        if shard not in assembling:
            assembling[shard] = out.assembler(shard, bool(writer.meta.get("store_images")))
        assembling[shard].add(batch, forward(views))
        if assembling[shard].full:
            full = assembling.pop(shard)
            out.put(full)
            skipped += full.skipped
        images += len(batch["index"])
        bar.update(len(batch["index"]))
        bar.set_postfix_str(progress_text(images * views.shape[1], out.bytes_written, time.perf_counter() - start),
                            refresh=False)
    return images, skipped
