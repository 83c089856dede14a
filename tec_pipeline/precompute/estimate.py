"""The dry run's measurements and extrapolation: one batch timed through each part of stage one
(decode + render, base forward, encode + durable write), scaled to the whole cache.

The write is measured for real, on the target filesystem where it is local (a temporary cache
beside the target path, removed afterwards), so the bytes per view and the write time are
those of the real store, codecs and disk.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from ..cache.assemble import ShardAssembler
from ..cache.schema import check_same_cache, fs_root
from ..files import is_local
from ..cache.store import create_cache, open_cache
from ..errors import UserError

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn()'s result and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn()
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
    """Encode and durably write `assembled` as the one shard of a throw-away cache in `target_dir`
    (a system temp dir when None) -> (the store's write stats, seconds). Leaves nothing behind."""
    n = len(assembled.images)
    tmp = Path(tempfile.mkdtemp(prefix=".tec-dry-run-", dir=target_dir))
    try:
        writer = create_cache(str(tmp / "probe"), {**meta, "num_images": n, "images_per_shard": n})
        return timed(lambda: writer.write_shard(0, assembled.data, assembled.raw_images))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def estimated_seconds(per_view: dict, num_workers: int) -> float:
    """Seconds per view of the pipelined run: workers decode in parallel with the forward, and the
    writer thread overlaps both, so the slowest stage sets the pace."""
    if num_workers == 0:
        return max(per_view["load"] + per_view["compute"], per_view["write"])
    return max(per_view["load"] / num_workers, per_view["compute"], per_view["write"])


def extrapolate(meta: dict, views: int, seconds: dict, stats: dict, target_dir: Optional[Path],
                num_workers: int, processes: int) -> dict:
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
    est["est_seconds"] = estimated_seconds(per_view, num_workers) * est["total_views"] / processes
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
          f"encode+write {per['write'] * 1e3:.2f} ms; estimated {duration(est['est_seconds'])}; "
          f"existing cache: {est['existing']}; nothing written")
