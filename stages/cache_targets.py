"""Stage one, `tec-pipeline cache-targets`: run the frozen base model once over V views of
every image and write the enhanced targets (Sec. 2.3) with each view's crop to a cache.

Orchestration only: the pieces live in the library (sources and the view DataLoader in
`tec_pipeline.data`, the forward and Eq. 2 / top-k in `tec_pipeline.targets`, storage in
`tec_pipeline.cache.store`). What this module adds is the loop around them:

- DataLoader workers decode and render; the main thread runs batched base forwards under
  `inference_mode` (bf16 autocast on CUDA, fp32 on CPU); a background thread writes whole
  shards, so compute and storage overlap (DESIGN: stage one is often disk-bound).
- Under `accelerate launch` each process takes a contiguous range of shards; rank 0 creates
  the cache and finalizes it once every process is done.
- A rerun skips completed shards; batches never straddle shards, so a resumed run feeds the
  base model exactly the batches of an uninterrupted one and writes the same arrays.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

import tec_pipeline
from tec_pipeline.config import Config
from tec_pipeline.data import BadImageError, open_source, source_location
from tec_pipeline.data.view_dataset import ViewDataset, shard_batches, view_loader
from tec_pipeline.errors import UserError
from tec_pipeline.cache.assemble import BackgroundWriter, ShardAssembler
from tec_pipeline.base_targets import base_sha256, compute_dtype_for, dtype_name, load_base, view_targets


# ----------------------------------------------------------------------------- settings


def check_settings(cfg: Config) -> None:
    """Refuse impossible settings before anything is loaded: one line naming the key."""
    d, c = cfg.data, cfg.cache
    rules = [
        (d.views >= 1, f"data.views={d.views}: need at least one view per image"),
        (d.img_size >= 1, f"data.img_size={d.img_size}: must be positive"),
        (0 < d.scale_min <= d.scale_max <= 1, f"data.scale_min={d.scale_min}, data.scale_max={d.scale_max}: "
                                              "need 0 < scale_min <= scale_max <= 1"),
        (d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1"),
        (d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0"),
        (c.images_per_shard >= 1, f"cache.images_per_shard={c.images_per_shard}: must be >= 1"),
        (c.k_max >= 1, f"cache.k_max={c.k_max}: must be >= 1 (k=0, the cls row alone, is a prefix of any cache)"),
        (cfg.targets.last_layers >= 1, f"targets.last_layers={cfg.targets.last_layers}: must be >= 1"),
        (c.zstd_level >= 0, f"cache.zstd_level={c.zstd_level}: must be >= 0"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def check_base(cfg: Config, base) -> None:
    """Settings that need the built base: patch grid, k_max, last_layers."""
    patch = base.patch_embed.patch_size[0]
    if cfg.data.img_size % patch:
        raise UserError(f"data.img_size={cfg.data.img_size} is not divisible by the base patch size {patch}")
    num_patches = base.patch_embed.num_patches
    if cfg.cache.k_max > num_patches:
        raise UserError(f"cache.k_max={cfg.cache.k_max} exceeds the {num_patches} patches of a "
                        f"{cfg.data.img_size}px image at patch {patch}")
    if cfg.targets.last_layers > len(base.blocks):
        raise UserError(f"targets.last_layers={cfg.targets.last_layers} exceeds the base depth {len(base.blocks)}")


def cache_meta(cfg: Config, source, base, compute_dtype: Optional[torch.dtype]) -> dict:
    """Metadata of the cache: layout for the store, `identity` for resume checks, and what
    `verify` needs to rebuild any view (source location, checkpoint path, view settings)."""
    d, c = cfg.data, cfg.cache
    arch = {**asdict(cfg.base.arch), "img_size": d.img_size}
    ckpt = cfg.base.checkpoint
    ckpt_sha = base_sha256(ckpt, base)
    precision = dtype_name(compute_dtype)
    fingerprint = source.fingerprint()  # stats every file of an ImageFolder: once
    # Keys mirror the config, so a refused rerun names the setting to change ("data.views").
    identity = {
        "base": {"arch": arch, "checkpoint_sha256": ckpt_sha},
        "seed": cfg.seed,
        "data": {"img_size": d.img_size, "views": d.views, "scale_min": d.scale_min, "scale_max": d.scale_max,
                 "fingerprint": fingerprint, "num_images": len(source)},
        "targets": {"last_layers": cfg.targets.last_layers},
        "cache": {"k_max": c.k_max, "feat_dtype": c.feat_dtype, "attn_dtype": c.attn_dtype, "store": c.store},
        "compute_dtype": precision,
    }
    return {
        "store": c.store, "num_images": len(source), "views": d.views,
        "num_patches": base.patch_embed.num_patches, "feat_dim": base.embed_dim,
        "heads": base.blocks[-1].attn.num_heads, "k_max": c.k_max, "images_per_shard": c.images_per_shard,
        "feat_dtype": c.feat_dtype, "attn_dtype": c.attn_dtype, "zstd_level": c.zstd_level,
        "store_images": c.store_images, "identity": identity,
        "source": {"kind": d.kind, "path": source_location(d.kind, d.path), "num_images": len(source),
                   "fingerprint": fingerprint},
        "base": {"arch": arch, "checkpoint": str(Path(ckpt).absolute()) if ckpt else None,
                 "checkpoint_sha256": ckpt_sha, "patch_size": base.patch_embed.patch_size[0],
                 "embed_dim": base.embed_dim, "depth": len(base.blocks), "num_heads": base.blocks[-1].attn.num_heads},
        "seed": cfg.seed, "img_size": d.img_size, "scale": [d.scale_min, d.scale_max],
        "last_layers": cfg.targets.last_layers, "compute_dtype": precision,
        "package_version": tec_pipeline.__version__,
    }


# ----------------------------------------------------------------------------- processes


def process_state():
    """accelerate's PartialState; on a machine without CUDA it must be told to use CPU
    (gloo), or a multi-process launch would quietly run as independent single processes."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def own_shards(num_shards: int, rank: int, world: int) -> range:
    """This process's contiguous part of `num_shards` shards (shard-aligned: no file has two writers)."""
    per, extra = divmod(num_shards, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def _broadcast(obj: Any, state) -> Any:
    """Rank 0's `obj` on every process."""
    if state.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, state) -> list:
    """Every process's `obj`, in rank order."""
    if state.num_processes == 1:
        return [obj]
    out: list = [None] * state.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def open_for_writing(url: str, meta: dict, overwrite: bool, state):
    """Rank 0 creates (or checks and reopens) the cache; the others reopen it afterwards.
    A refusal on rank 0 is sent to every process so none waits forever."""
    from tec_pipeline.cache.store import create_cache

    writer, error = None, None
    if state.is_main_process:
        try:
            writer = create_cache(url, meta, overwrite=overwrite)
        except UserError as err:
            error = str(err)
            if state.num_processes == 1:
                raise
    error = _broadcast(error, state)
    if error is not None:
        raise UserError(error)
    if not state.is_main_process:
        writer = create_cache(url, meta, overwrite=False)
    return writer


# ----------------------------------------------------------------------------- the run


def run_cache_targets(cfg: Config, overwrite: bool = False, dry_run: bool = False) -> dict:
    """Stage one. Returns the run summary (images, views, skipped, bytes, wall time)."""
    start = time.perf_counter()
    check_settings(cfg)
    state = process_state()
    source = open_source(cfg.data)
    base = load_base(cfg.base.arch, cfg.base.checkpoint, cfg.data.img_size, cfg.seed)
    check_base(cfg, base)
    device = state.device
    base.to(device)
    compute_dtype = compute_dtype_for(device)
    meta = cache_meta(cfg, source, base, compute_dtype)
    dataset = ViewDataset(source, cfg.seed, cfg.data.views, cfg.data.img_size,
                          (cfg.data.scale_min, cfg.data.scale_max), keep_raw=cfg.cache.store_images)
    if dry_run:
        return dry_run_estimate(cfg, meta, dataset, base, device, compute_dtype, state)
    writer = open_for_writing(cfg.cache.path, meta, overwrite, state)
    # Rank 0 lists the shards still to do and every process takes a contiguous slice of that
    # list, so a resumed run is balanced too. Decided once, before anyone writes.
    pending = _broadcast([s for s in range(writer.num_shards) if not writer.is_done(s)]
                         if state.is_main_process else None, state)
    mine = [pending[i] for i in own_shards(len(pending), state.process_index, state.num_processes)]
    local = compute_shards(cfg, writer, dataset, base, device, compute_dtype, mine, state)
    state.wait_for_everyone()
    runs = _gather(local, state)
    summary = merge_summaries(runs, meta, time.perf_counter() - start, source)
    if state.is_main_process:
        summary = finish_cache(cfg.cache.path, writer, summary, len(pending), source)
        print_summary(summary, cfg.cache.path)
    state.wait_for_everyone()
    return summary


def compute_shards(cfg: Config, writer, dataset: ViewDataset, base, device, compute_dtype,
                   shards: list[int], state) -> dict:
    """Compute and write `shards` (this process's pending ones); returns this run's counts."""
    per_batch = max(1, cfg.data.batch_size // cfg.data.views)  # data.batch_size counts views
    ranges = [writer.shard_range(s) for s in shards]
    loader = view_loader(dataset, shard_batches(ranges, per_batch), cfg.data.num_workers,
                         pin_memory=device.type == "cuda")
    bar = progress_bar(sum(len(r) for r in ranges), state)
    out = BackgroundWriter(writer)
    skipped: list[dict] = []
    assembling: dict[int, ShardAssembler] = {}
    done_images, t0 = 0, time.perf_counter()
    try:
        for batch in loader:
            check_bad_images(batch, cfg.data.on_bad_image)
            targets = view_targets(base, batch["views"], cfg.targets.last_layers, cfg.cache.k_max,
                                   device, compute_dtype)
            shard = int(batch["index"][0]) // cfg.cache.images_per_shard
            if shard not in assembling:
                assembling[shard] = ShardAssembler(shard, writer.shard_range(shard), cfg.cache.store_images)
            assembling[shard].add(batch, targets)
            if assembling[shard].full:
                full = assembling.pop(shard)
                out.put(full)
                skipped += full.skipped
            done_images += len(batch["index"])
            bar.update(len(batch["index"]))
            bar.set_postfix_str(progress_text(done_images * cfg.data.views, out.bytes_written, time.perf_counter() - t0),
                                refresh=False)
        out.close()
    finally:
        bar.close()
        out.stop()  # on an error: let the shards already queued (complete ones) finish writing
    for item in skipped:
        item["name"] = dataset.source.name(item["index"])
    return {"images": done_images, "views": done_images * cfg.data.views, "bytes": out.bytes_written,
            "skipped": skipped, "write_seconds": out.seconds, "shards": len(shards),
            "loop_seconds": time.perf_counter() - t0}


def check_bad_images(batch: dict, on_bad_image: str) -> None:
    """data.on_bad_image=error: stop at the first undecodable image, naming it."""
    if on_bad_image == "error":
        for ok, error in zip(batch["valid"].tolist(), batch["error"]):
            if not ok:
                raise BadImageError(f"{error} (set data.on_bad_image=skip to skip such files)")


def progress_bar(total: int, state) -> tqdm:
    """Images/s and ETA from tqdm; views/s and write MB/s go in the postfix. Rank 0 only."""
    desc = "cache-targets" if state.num_processes == 1 else f"cache-targets [rank 0 of {state.num_processes}]"
    return tqdm(total=total, unit="img", desc=desc, disable=not state.is_main_process or total == 0,
                dynamic_ncols=True)


def progress_text(views: int, nbytes: int, seconds: float) -> str:
    """The postfix: what storage sees, since stage one is often disk-bound (DESIGN)."""
    seconds = max(seconds, 1e-9)
    return f"{views / seconds:.1f} views/s, {nbytes / 1e6:.1f} MB, {nbytes / 1e6 / seconds:.1f} MB/s"


def merge_summaries(runs: list[dict], meta: dict, wall: float, source) -> dict:
    """One summary from every process's counts (this run only)."""
    images = sum(r["images"] for r in runs)
    views = sum(r["views"] for r in runs)
    nbytes = sum(r["bytes"] for r in runs)
    skipped = sorted((s for r in runs for s in r["skipped"]), key=lambda s: s["index"])
    return {"images": images, "views": views, "skipped": skipped, "bytes": nbytes, "wall_seconds": round(wall, 3),
            "bytes_per_view": nbytes / views if views else 0.0, "processes": len(runs),
            "num_images": meta["num_images"], "total_views": meta["num_images"] * meta["views"],
            "write_seconds": round(sum(r["write_seconds"] for r in runs), 3),
            "loop_seconds": round(max(r["loop_seconds"] for r in runs), 3)}  # data + forward + writes, no setup


def finish_cache(url: str, writer, summary: dict, pending: int, source) -> dict:
    """Rank 0: record the summary and mark the cache complete (the store refuses while a shard
    is missing). A rerun over a complete cache computes nothing and leaves it as it was."""
    from tec_pipeline.cache.store import open_cache

    if pending == 0 and open_cache(url).is_complete():
        summary["already_complete"] = True
        return summary
    summary["skipped"] = sorted(summary["skipped"] + earlier_skips(url, summary["skipped"], source),
                                key=lambda s: s["index"])
    writer.finalize(summary)
    return summary


def earlier_skips(url: str, now: list[dict], source) -> list[dict]:
    """Images skipped by an earlier, interrupted run: each shard's completion marker lists them."""
    from tec_pipeline.cache.schema import fs_root, read_markers

    seen = {s["index"] for s in now}
    fs, root = fs_root(url)
    indices = sorted(i for m in read_markers(fs, root).values() for i in m["stats"].get("invalid", []) if i not in seen)
    return [{"index": i, "name": source.name(i), "error": "skipped by an earlier run of this cache"} for i in indices]


def print_summary(summary: dict, url: str) -> None:
    """The final line, then one line per skipped file."""
    if summary.get("already_complete"):
        print(f"cache-targets: {url} is already complete ({summary['num_images']} images); nothing to do")
        return
    print(f"cache-targets: {summary['images']} images, {summary['views']} views, {len(summary['skipped'])} skipped, "
          f"{summary['bytes'] / 1e6:.2f} MB, {summary['wall_seconds']:.1f} s, "
          f"{summary['bytes_per_view'] / 1e3:.1f} KB/view -> {url}")
    for item in summary["skipped"]:
        print(f"  skipped {item.get('name', item['index'])}: {item['error']}")


# ----------------------------------------------------------------------------- dry run


def local_dir(url: str) -> Optional[Path]:
    """The nearest existing local directory at or above a cache path; None for remote URLs."""
    from tec_pipeline.cache.schema import fs_root, is_local

    fs, root = fs_root(url)
    if not is_local(fs):
        return None
    path = Path(root)
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def dry_run_estimate(cfg: Config, meta: dict, dataset: ViewDataset, base, device, compute_dtype, state) -> dict:
    """Measure one batch (decode + render, base forward) and one encode + durable write of it to a
    throw-away cache on the target filesystem (local) or in a temp dir, then extrapolate:
    bytes/view, total size, free space, time. Leaves nothing behind."""
    from tec_pipeline.cache.store import create_cache

    n = min(max(1, cfg.data.batch_size // cfg.data.views), meta["num_images"])
    t0 = time.perf_counter()
    batch = next(iter(view_loader(dataset, [list(range(n))], num_workers=0)))
    load_s = time.perf_counter() - t0
    check_bad_images(batch, cfg.data.on_bad_image)
    run = lambda: view_targets(base, batch["views"], cfg.targets.last_layers, cfg.cache.k_max, device, compute_dtype)  # noqa: E731
    run()  # warm-up: first-call allocations and kernel selection are not the steady state
    t0 = time.perf_counter()
    targets = run()
    compute_s = time.perf_counter() - t0
    probe = ShardAssembler(0, range(n), cfg.cache.store_images)
    probe.add(batch, targets)
    target_dir = local_dir(cfg.cache.path)
    tmp = Path(tempfile.mkdtemp(prefix=".tec-dry-run-", dir=target_dir))
    try:
        writer = create_cache(str(tmp / "probe"), {**meta, "num_images": n, "images_per_shard": n})
        t0 = time.perf_counter()
        stats = writer.write_shard(0, probe.data, probe.raw_images)
        write_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    views = n * cfg.data.views
    est = {
        "dry_run": True, "bytes_per_view": stats["bytes"] / views,
        "total_views": meta["num_images"] * meta["views"],
        "free_bytes": shutil.disk_usage(target_dir).free if target_dir else None,
        "seconds_per_view": {"load": load_s / views, "compute": compute_s / views, "write": write_s / views},
        "quantization": {k: v for k, v in stats.items() if "rel_rms" in k or "kl" in k},
    }
    est["total_bytes"] = est["bytes_per_view"] * est["total_views"]
    est["est_seconds"] = estimated_seconds(est["seconds_per_view"], cfg.data.num_workers) * \
        est["total_views"] / state.num_processes
    est["existing"] = existing_cache_note(cfg.cache.path, meta)
    if state.is_main_process:
        print_estimate(est, cfg.cache.path)
    return est


def estimated_seconds(per_view: dict, num_workers: int) -> float:
    """Seconds per view of the pipelined run: workers decode in parallel with the forward, and the
    writer thread overlaps both, so the slowest stage sets the pace."""
    if num_workers == 0:
        return max(per_view["load"] + per_view["compute"], per_view["write"])
    return max(per_view["load"] / num_workers, per_view["compute"], per_view["write"])


def existing_cache_note(url: str, meta: dict) -> str:
    """What a real run would do with what is already at `url` (read-only)."""
    from tec_pipeline.cache.schema import check_same_cache
    from tec_pipeline.cache.store import open_cache

    try:
        reader = open_cache(url)
    except UserError:
        return "none"
    try:
        check_same_cache(url, reader.meta, meta)
    except UserError as err:
        return f"refused without --overwrite: {err}"
    missing = len(reader.missing_shards())
    return "complete" if reader.is_complete() else f"resume: {reader.num_shards - missing} of {reader.num_shards} shards done"


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_estimate(est: dict, url: str) -> None:
    per = est["seconds_per_view"]
    free = "n/a (not a local path)" if est["free_bytes"] is None else f"{est['free_bytes'] / 1e9:.2f} GB"
    print(f"dry run: {est['bytes_per_view'] / 1e3:.1f} KB/view x {est['total_views']} views = "
          f"{est['total_bytes'] / 1e9:.3f} GB at {url}; free space {free}")
    if est["free_bytes"] is not None and est["free_bytes"] < est["total_bytes"]:
        print(f"dry run: WARNING: not enough free space ({est['total_bytes'] / 1e9:.3f} GB needed)")
    print(f"dry run: measured per view: decode+render {per['load'] * 1e3:.2f} ms, forward {per['compute'] * 1e3:.2f} ms, "
          f"encode+write {per['write'] * 1e3:.2f} ms; estimated {duration(est['est_seconds'])}; "
          f"existing cache: {est['existing']}; nothing written")
