"""Stage two's read amplification: bytes read from storage per byte of the views an epoch uses.

An epoch of stage two takes one of the V cached views of each image. For each store (zarr,
webdataset) and view mode (cycle, random) this writes a cache of ViT-B/16-shaped int8/uint8
targets (L=196, C=768, H=12, k=15; Gaussian features and logits, whose compressed size is what
matters here), drops its files from the page cache (``posix_fadvise(DONTNEED)``), reads one
epoch the way training does (`CachedBatches` over `epoch_order`/`plan_epoch`, targets only, no
rendering, one process = one loader worker) and reports:

- **storage MB**: ``read_bytes`` of ``/proc/self/io`` over the epoch (what the disk delivered,
  readahead included);
- **requested MB**: the bytes the reader asked for (every range read, counted);
- **used MB**: the stored bytes of the views the epoch takes (``CacheReader.view_bytes``);
- amplification = storage / used, and cold views/s.

The mode "whole" reads each shard file whole (``read_shard``), as a reader blind to the views an
epoch uses would, for comparison. Goals: storage / used <= 1.1 in cycle mode and <= 1.5 in random
mode.

    .venv/bin/python benchmarks/read_amplification.py --repeats 3 --out benchmarks/results/read_amplification.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tec_pipeline.cache import storage  # noqa: E402
from tec_pipeline.cache.store import create_cache, open_cache  # noqa: E402
from tec_pipeline.train.batches import CachedBatches  # noqa: E402
from tec_pipeline.train.loader import epoch_loader  # noqa: E402
from tec_pipeline.train.batches import reader_shards  # noqa: E402
from tec_pipeline.train.loader import epoch_order, plan_epoch, view_indices  # noqa: E402

SHAPES = {"vitb": (196, 768, 12, 15), "vits": (196, 384, 6, 15)}  # L, C, H, k_max


def storage_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def evict(root: Path) -> None:
    """Drop every file of the cache from the page cache (they were fsynced when written)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Requested:
    """Counts the bytes of every range read (`storage.RangeReader.read`) while active."""

    def __init__(self):
        self.bytes, self._read = 0, storage.RangeReader.read

    def __enter__(self):
        counter = self

        def read(reader, path, start=None, end=None):
            data = counter._read(reader, path, start, end)
            counter.bytes += len(data)
            return data
        storage.RangeReader.read = read
        return self

    def __exit__(self, *exc):
        storage.RangeReader.read = self._read


def write_cache(url: str, store: str, args) -> None:
    """Gaussian targets (patch-normalized features, logits of std 2.5) through the store API."""
    L, C, H, K = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    meta = dict(store=store, num_images=args.images, views=args.views, num_patches=L, feat_dim=C, heads=H,
                k_max=K, images_per_shard=args.images_per_shard, feat_dtype="int8", attn_dtype="uint8",
                zstd_level=1, img_size=32, identity={"benchmark": "read_amplification"})
    writer = create_cache(url, meta)
    V = args.views
    for shard in range(writer.num_shards):
        n = len(writer.shard_range(shard))
        writer.write_shard(shard, {
            "crop": rng.integers(0, 32, (n, V, 5)).astype(np.int32),
            "feat": rng.normal(size=(n, V, L, C)).astype(np.float32),
            "feat_mean": rng.normal(size=(n, V, C)).astype(np.float32),
            "feat_std": rng.uniform(0.5, 2, (n, V, C)).astype(np.float32),
            "attn": (2.5 * rng.normal(size=(n, V, K + 1, H, L))).astype(np.float32),
            "topk_idx": np.argsort(-rng.random((n, V, L)), axis=-1)[..., :K],
            "valid": np.ones(n, np.uint8), "label": np.zeros(n, np.int64)})
    writer.finalize({})


def epoch_plan(reader, mode: str, epoch: int, batch: int):
    order = epoch_order(reader_shards(reader), None, seed=0, epoch=epoch, buffer_shards=2)
    return plan_epoch(order, view_indices(order, 0, epoch, reader.views, mode), batch)


def used_bytes(reader, plan) -> int:
    total = 0
    for shard, rng in enumerate(reader_shards(reader)):
        mine = (plan.images >= rng.start) & (plan.images < rng.stop)
        total += reader.view_bytes(shard, plan.images[mine] - rng.start, plan.views[mine])
    return total


def read_epoch(root: Path, mode: str, epoch: int, args) -> dict:
    """One cold epoch; 'whole' reads every shard file whole instead (every view of every image)."""
    reader = open_cache(str(root))
    plan = epoch_plan(reader, "cycle" if mode == "whole" else mode, epoch, args.batch)
    used = used_bytes(reader, plan)
    evict(root)
    before, start = storage_read_bytes(), time.perf_counter()
    with Requested() as requested:
        if mode == "whole":
            for shard in range(reader.num_shards):
                reader.read_shard(shard)
        else:
            make = CachedBatches(reader, None, 32, SHAPES[args.shape][3] + 1, buffer_shards=2, render=False)
            for _ in epoch_loader(plan, make, 0, 0):
                pass
    seconds = time.perf_counter() - start
    views = plan.images.size
    return {"storage_bytes": storage_read_bytes() - before, "requested_bytes": requested.bytes, "used_bytes": used,
            "views": views, "seconds": seconds, "views_per_s": views / seconds}


def summarize(runs: list[dict]) -> dict:
    out = {k: runs[0][k] for k in ("used_bytes", "views")}
    for key in ("storage_bytes", "requested_bytes", "views_per_s"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    out["amplification"] = out["storage_bytes"]["median"] / out["used_bytes"]
    out["requested_over_used"] = out["requested_bytes"]["median"] / out["used_bytes"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--shape", choices=sorted(SHAPES), default="vitb")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--stores", nargs="+", default=["zarr", "webdataset"])
    p.add_argument("--modes", nargs="+", default=["cycle", "random", "whole"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="Where the caches go (default: a temporary folder, removed).")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for store in args.stores:
            root = Path(tmp) / f"{store}.cache"
            write_cache(str(root), store, args)
            for mode in args.modes:
                runs = [read_epoch(root, mode, epoch, args) for epoch in range(1, args.repeats + 1)]
                rows.append({"store": store, "mode": mode, **summarize(runs)})
    print(format_table(rows, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


def format_table(rows: list[dict], args) -> str:
    L, C, H, K = SHAPES[args.shape]
    lines = [f"{args.images} images x {args.views} views, L={L} C={C} H={H} k={K}, int8/uint8, batch {args.batch}, "
             f"{args.repeats} cold epochs each (median, min-max)",
             f"{'store':<11}{'mode':<8}{'storage MB':>12}{'requested MB':>14}{'used MB':>9}{'storage/used':>14}"
             f"{'cold views/s':>22}"]
    for r in rows:
        s, v = r["storage_bytes"], r["views_per_s"]
        lines.append(f"{r['store']:<11}{r['mode']:<8}{s['median'] / 1e6:>12.1f}{r['requested_bytes']['median'] / 1e6:>14.1f}"
                     f"{r['used_bytes'] / 1e6:>9.1f}{r['amplification']:>14.3f}"
                     f"{v['median']:>10.0f} ({v['min']:.0f}-{v['max']:.0f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
