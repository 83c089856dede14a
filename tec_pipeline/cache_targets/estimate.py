"""The dry run's measurements and extrapolation: one batch timed through each part of stage one
(decode + render, base forward, encoding on the compute device, compression + durable write),
scaled to the whole cache.

The write is measured for real, on the target filesystem where it is local (a temporary cache
beside the target path, removed afterwards), so the bytes per view and the write time are
those of the real store, codecs and disk: the ETA includes the filesystem's write rate.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from ..cache.assemble import ShardAssembler
from ..cache.schema import check_same_cache
from ..cache.storage import fs_root, one_thread_per_shard
from ..files import is_local
from ..cache.store import create_cache, open_cache
from ..errors import UserError

T = TypeVar("T")


def timed(fn: Callable[[], T], device: Optional[torch.device] = None) -> tuple[T, float]:
    """fn()'s result and its wall time in seconds (until `device` has finished the work it was
    given, for a CUDA device)."""
    t0 = time.perf_counter()
    out = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def local_dir(url: str) -> Optional[Path]:
    """The nearest existing local directory at or above a cache path; None for remote URLs."""
    fs, root = fs_root(url)
    if not is_local(fs):
        return None
    path = Path(root)
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def probe_write(target_dir: Optional[Path], meta: dict, assembled: ShardAssembler) -> tuple[dict, float]:
    """Compress and durably write `assembled` as the one shard of a throw-away cache made with
    `meta` in `target_dir` (a system temp dir when None), on one thread as a writer pool's thread
    does -> (the store's write stats, seconds). A real write: the filesystem's own rate is in
    the seconds. Leaves nothing behind."""
    tmp = Path(tempfile.mkdtemp(prefix=".tec-dry-run-", dir=target_dir))
    try:
        writer = create_cache(str(tmp / "probe"), meta)
        with one_thread_per_shard():
            return timed(lambda: writer.write_encoded_shard(0, assembled.data, assembled.stats(), assembled.raw_images))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def estimated_seconds(per_view: dict, threads: dict) -> float:
    """Seconds per view of the pipelined run: `threads["loader"]` workers decode in parallel with
    the main thread's forward + encoding, and `threads["writer"]` writer threads overlap both, so
    the slowest stage sets the pace."""
    main = per_view["compute"] + per_view["encode"] + (0.0 if threads["loader"] else per_view["load"])
    loader = per_view["load"] / threads["loader"] if threads["loader"] else 0.0
    return max(loader, main, per_view["write"] / threads["writer"])


def extrapolate(meta: dict, views: int, seconds: dict, stats: dict, target_dir: Optional[Path],
                threads: dict, processes: int) -> dict:
    """The whole cache from one measured batch of `views` views: bytes per view and in total,
    free space at the target, the measured quantization error and the wall time on `processes`."""
    per_view = {part: s / views for part, s in seconds.items()}
    est = {
        "dry_run": True, "bytes_per_view": stats["bytes"] / views,
        "total_views": meta["num_images"] * meta["views"],
        "free_bytes": shutil.disk_usage(target_dir).free if target_dir else None,
        "seconds_per_view": per_view,
        "quantization": {k: v for k, v in stats.items() if "rel_rms" in k or "kl" in k},
    }
    est["total_bytes"] = est["bytes_per_view"] * est["total_views"]
    est["write_mb_per_s"] = stats["bytes"] / 1e6 / max(seconds["write"], 1e-9)
    est["est_seconds"] = estimated_seconds(per_view, threads) * est["total_views"] / processes
    return est


def existing_cache_note(url: str, meta: dict) -> str:
    """What a real run would do with what is already at `url` (read-only)."""
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
    """Seconds, minutes or hours, whichever reads best."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_estimate(est: dict, url: str) -> None:
    """Size against free space (warning when it will not fit), then the measured times."""
    per = est["seconds_per_view"]
    free = "n/a (not a local path)" if est["free_bytes"] is None else f"{est['free_bytes'] / 1e9:.2f} GB"
    print(f"dry run: {est['bytes_per_view'] / 1e3:.1f} KB/view x {est['total_views']} views = "
          f"{est['total_bytes'] / 1e9:.3f} GB at {url}; free space {free}")
    if est["free_bytes"] is not None and est["free_bytes"] < est["total_bytes"]:
        print(f"dry run: WARNING: not enough free space ({est['total_bytes'] / 1e9:.3f} GB needed)")
    print(f"dry run: measured per view: decode+render {per['load'] * 1e3:.2f} ms, forward {per['compute'] * 1e3:.2f} ms, "
          f"encode {per['encode'] * 1e3:.2f} ms, compress+write {per['write'] * 1e3:.2f} ms (one thread, "
          f"{est['write_mb_per_s']:.0f} MB/s); estimated {duration(est['est_seconds'])}; "
          f"existing cache: {est['existing']}; nothing written")
