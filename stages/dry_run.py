"""`tec-pipeline cache-targets --dry-run`: what stage one would cost, measured on one batch.

One batch goes through each part of the real run in turn (decode + render, base forward,
encoding on the compute device and shard assembly, compression + durable write to a throw-away
cache on the target filesystem: a real write, so the filesystem's own rate is measured), and
the times and bytes per view are scaled to the whole cache, then printed with the free space
and what a real run would do with a cache already there. Nothing is left behind.
"""
from __future__ import annotations

from tec_pipeline.cache.assemble import ShardAssembler, default_writer_threads
from tec_pipeline.cache.encode import NonFiniteTargetError
from tec_pipeline.cache.pq import fit_pq
from tec_pipeline.config import Config
from tec_pipeline.cache_targets.view_dataset import BatchViews, ViewDataset, view_loader
from tec_pipeline.cache_targets.estimate import (
    existing_cache_note, extrapolate, local_dir, print_estimate, probe_write, timed,
)
from tec_pipeline.cache_targets.settings import images_per_batch, non_finite_error
from tec_pipeline.cache_targets.summary import check_bad_images


def dry_run_estimate(cfg: Config, meta: dict, dataset: ViewDataset, views_of: BatchViews, forward, state) -> dict:
    """Measure one batch and extrapolate: bytes/view, total size, free space, time. Called by
    `run_cache_targets(..., dry_run=True)` once the base and the cache metadata exist;
    `forward` is its base forward (views -> targets on the compute device)."""
    n = min(images_per_batch(cfg), meta["num_images"])
    batch, load_s = timed(lambda: next(iter(view_loader(dataset, [list(range(n))], num_workers=0))))
    views, render_s = timed(lambda: views_of(batch), state.device)
    check_bad_images(batch, cfg.data.on_bad_image)
    forward(views)  # warm-up: first-call allocations and kernel selection are not the steady state
    targets, compute_s = timed(lambda: forward(views), state.device)
    probe_meta = {**meta, "num_images": n, "images_per_shard": n}  # the batch is the probe's one shard
    pq = fit_pq(targets["feat"], cfg.cache.pq_subvectors) if meta["feat_dtype"] == "pq" else None  # on the batch
    probe = ShardAssembler(probe_meta, 0, cfg.cache.store_images, pq=pq)
    try:
        _, encode_s = timed(lambda: (probe.add(batch, targets), probe.finish()))  # finish: its checks, read
    except NonFiniteTargetError as err:
        raise non_finite_error(err, meta) from None
    target_dir = local_dir(cfg.cache.path)
    stats, write_s = probe_write(target_dir, probe_meta, probe)
    seconds = {"load": load_s + render_s, "compute": compute_s, "encode": encode_s, "write": write_s}
    threads = {"loader": cfg.data.num_workers, "writer": cfg.cache.writer_threads or default_writer_threads()}
    est = extrapolate(meta, n * cfg.data.views, seconds, stats, target_dir, threads, state.num_processes)
    est["existing"] = existing_cache_note(cfg.cache.path, meta)
    if state.is_main_process:
        print_estimate(est, cfg.cache.path)
    return est
