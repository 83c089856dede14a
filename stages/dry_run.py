"""`tec-pipeline cache-targets --dry-run`: what stage one would cost, measured on one batch
(README "Stage one: the target cache").

One batch goes through each part of the real run in turn (decode + render, base forward,
shard assembly, encode + durable write to a throw-away cache on the target filesystem), and
the times and bytes per view are scaled to the whole cache, then printed with the free space
and what a real run would do with a cache already there. Nothing is left behind.
"""
from __future__ import annotations

from tec_pipeline.base_targets import view_targets
from tec_pipeline.cache.assemble import ShardAssembler
from tec_pipeline.config import Config
from tec_pipeline.data.view_dataset import ViewDataset, view_loader
from tec_pipeline.precompute.estimate import (
    existing_cache_note, extrapolate, local_dir, print_estimate, probe_write, timed,
)
from tec_pipeline.precompute.settings import images_per_batch
from tec_pipeline.precompute.summary import check_bad_images


def dry_run_estimate(cfg: Config, meta: dict, dataset: ViewDataset, base, device, compute_dtype, state) -> dict:
    """Measure one batch and extrapolate: bytes/view, total size, free space, time. Called by
    `run_cache_targets(..., dry_run=True)` once the base and the cache metadata exist."""
    n = min(images_per_batch(cfg), meta["num_images"])
    batch, load_s = timed(lambda: next(iter(view_loader(dataset, [list(range(n))], num_workers=0))))
    check_bad_images(batch, cfg.data.on_bad_image)

    def forward():
        return view_targets(base, batch["views"], cfg.targets.last_layers, cfg.cache.k_max, device, compute_dtype)

    forward()  # warm-up: first-call allocations and kernel selection are not the steady state
    targets, compute_s = timed(forward)
    probe = ShardAssembler(0, range(n), cfg.cache.store_images)
    probe.add(batch, targets)
    target_dir = local_dir(cfg.cache.path)
    stats, write_s = probe_write(target_dir, meta, probe)
    est = extrapolate(meta, n * cfg.data.views, {"load": load_s, "compute": compute_s, "write": write_s}, stats,
                      target_dir, cfg.data.num_workers, state.num_processes)
    est["existing"] = existing_cache_note(cfg.cache.path, meta)
    if state.is_main_process:
        print_estimate(est, cfg.cache.path)
    return est
