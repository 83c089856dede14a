"""What stage one reports: progress while it runs, undecodable images, and the run's summary,
which rank 0 prints and records in the cache when it marks it complete (a view part: when it
records the part in the cache it grows).
"""
from __future__ import annotations

from tqdm import tqdm

from ..cache.growth import Growth, lineage, record_growth
from ..cache.schema import read_markers
from ..cache.storage import fs_root
from ..cache.store import open_cache
from ..data import BadImageError


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
    """The postfix: what storage sees, since at scale the writes, not the forward, may set the
    pace."""
    seconds = max(seconds, 1e-9)
    return f"{views / seconds:.1f} views/s, {nbytes / 1e6:.1f} MB, {nbytes / 1e6 / seconds:.1f} MB/s"


def merge_summaries(runs: list[dict], meta: dict, wall: float) -> dict:
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
    if pending == 0 and open_cache(url).is_complete():
        summary["already_complete"] = True
        return summary
    summary["skipped"] = sorted(summary["skipped"] + earlier_skips(url, summary["skipped"], source),
                                key=lambda s: s["index"])
    writer.finalize(summary)
    return summary


def finish_growth(url: str, growth: Growth) -> str:
    """Rank 0: record the complete view part in the cache `url` (one atomic write of its metadata
    file); returns the lineage of views the cache now reads as."""
    fs, root = fs_root(url)
    return lineage(record_growth(fs, root, growth))


def earlier_skips(url: str, now: list[dict], source) -> list[dict]:
    """Images skipped by an earlier, interrupted run: each shard's completion marker lists them."""
    seen = {s["index"] for s in now}
    fs, root = fs_root(url)
    indices = sorted(i for m in read_markers(fs, root).values() for i in m["stats"].get("invalid", []) if i not in seen)
    return [{"index": i, "name": source.name(i), "error": "skipped by an earlier run of this cache"} for i in indices]


def print_repairs(repaired: dict[int, str], url: str) -> None:
    """One line per shard found damaged on reopening, which this run writes again."""
    for shard, why in sorted(repaired.items()):
        print(f"cache-targets: {url} shard {shard}: {why}; writing it again")


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
