"""Pinned host memory per training process at the ImageNet recipe, measured on the real loader.

On CUDA every batch the loader makes ahead of the step is pinned (page-locked) host memory, and
torch's caching host allocator keeps what it pinned. So a process pins about (the most batches
alive at once) x (one batch's bytes). Both factors are measured here on stage two's own loader
(`EpochPlanner`, `PlannedBatches`, `batch_loader` with threads, as ``data.loader=dali`` reads:
the JPEG files, the targets in their stored dtypes, the crops, the mask noise), at the recipe's
shapes (configs/vitb_mae_in1k.yaml: V=8 views, ViT-B/16 targets, k=15, int8 / uint8) over a few
synthetic ~500x375 JPEGs, with a consumer that sleeps like a step so the loader runs ahead:

- bytes per view: every tensor of each batch (nbytes), over the views of the batch; a batch is
  the per-process batch (512) x that, as every tensor of a batch is per view;
- batches alive: started by the batch maker and not yet dropped by the consumer, at most.

Pinned bytes per process = batch bytes x batches alive; per node x 8. The JPEGs here are smaller
than ImageNet's (~110 KB on average, an estimate from its size), so the JSON also gives the
figure with the files at that size. Run:

    python benchmarks/pinned_memory.py --out benchmarks/results/pinned_memory.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import weakref
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import make_cache, make_images  # noqa: E402
from tec_pipeline.cache.store import open_cache  # noqa: E402
from tec_pipeline.config import DataConfig  # noqa: E402
from tec_pipeline.train.batches import CachedBatches  # noqa: E402
from tec_pipeline.train.batches import cache_image_source  # noqa: E402
from tec_pipeline.train.loader import PlannedBatches, batch_loader  # noqa: E402
from tec_pipeline.train.loader import EpochPlanner, mask_noise  # noqa: E402
from tec_pipeline.train.batches import reader_shards, valid_mask  # noqa: E402

IMAGENET_JPEG_BYTES = 110e3  # ~140 GB / 1.28 M train images: an estimate from the set's size
RECIPE = {"views": 8, "batch": 512, "processes": 8, "num_patches": 196, "feat_dim": 768, "heads": 12, "k": 15}


class CountedBatches:
    """A batch maker that counts the batches started; each thread's copy shares the counts (and
    copies the maker, so each still has its own open shards)."""

    def __init__(self, inner, alive: dict):
        self.inner, self.alive = inner, alive

    def __copy__(self):
        return CountedBatches(copy.copy(self.inner), self.alive)

    def expect(self, images, views) -> None:
        self.inner.expect(images, views)

    def __call__(self, images, views):
        with self.alive["lock"]:
            self.alive["now"] += 1
            self.alive["most"] = max(self.alive["most"], self.alive["now"])
        return self.inner(images, views)


def dropped(alive: dict) -> None:
    with alive["lock"]:
        alive["now"] -= 1


def measure(url: str, args) -> dict:
    """One pass of the loader over `--batches` batches with a consumer sleeping `--step-s` per batch."""
    reader = open_cache(url)
    alive = {"lock": threading.Lock(), "now": 0, "most": 0}
    make = CountedBatches(CachedBatches(reader, cache_image_source(reader), 224, RECIPE["k"] + 1, buffer_shards=2,
                                        files_only=True), alive)
    per_epoch = reader.num_images // args.batch
    planner = EpochPlanner(reader_shards(reader), valid_mask(reader), 0, 2, reader.views, "cycle", args.batch, 1, 0,
                           per_epoch)
    masks = partial(mask_noise, 0, batch=args.batch, num_patches=RECIPE["num_patches"])
    loader = batch_loader(PlannedBatches(planner, per_epoch, make, 0, args.batches, masks), args.workers,
                          threads=True, prefetch=args.prefetch)
    per_view = []
    for batch in loader:
        views = len(batch["crop"])
        per_view.append({k: v.nbytes / views for k, v in batch.items()})
        weakref.finalize(batch["crop"], dropped, alive)
        time.sleep(args.step_s)  # the step
        del batch
    keys = per_view[0].keys()
    return {"bytes_per_view": {k: statistics.mean(p[k] for p in per_view) for k in keys},
            "batches_alive_most": alive["most"], "batches": len(per_view)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="synthetic JPEGs (the cache holds V=8 views of each)")
    p.add_argument("--batch", type=int, default=32, help="views per batch here (the bytes scale to the recipe's 512)")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=10, help="loader threads (the recipe's data.num_workers)")
    p.add_argument("--prefetch", type=int, default=DataConfig.prefetch_batches, help="data.prefetch_batches")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds the consumer holds each batch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "recipe": RECIPE,
              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="tec-pinned-") as tmp:
        tmp = Path(tmp)
        source = make_images(tmp / "images", args.images)
        shapes = argparse.Namespace(views=RECIPE["views"], k=RECIPE["k"], images_per_shard=32, feat_dtype="int8",
                                    attn_dtype="uint8", img_size=224)
        make_cache(str(tmp / "cache.zarr"), source, shapes, RECIPE["num_patches"], RECIPE["feat_dim"],
                   RECIPE["heads"], loader="dali")
        result.update(measure(str(tmp / "cache.zarr"), args))
    per_view = result["bytes_per_view"]
    view = sum(per_view.values())
    imagenet_view = view - per_view["files"] + IMAGENET_JPEG_BYTES
    alive, bound = result["batches_alive_most"], args.prefetch + 2
    for name, b in (("measured", view), ("imagenet_jpegs", imagenet_view)):
        batch = b * RECIPE["batch"]
        result[name] = {"bytes_per_view": b, "batch_bytes": batch, "pinned_per_process": batch * alive,
                        "pinned_per_process_bound": batch * bound, "pinned_per_node_bound": batch * bound * 8}
    result["batches_alive_bound"] = bound
    print_table(result, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


def print_table(result: dict, args) -> None:
    print(f"\npinned host memory at the ImageNet recipe (V=8, ViT-B/16 int8/uint8 targets, batch 512, "
          f"{args.workers} loader threads, data.prefetch_batches={args.prefetch}); load average "
          f"{result['load_average'][0]:.2f}")
    print("bytes per view: " + ", ".join(f"{k} {v / 1e3:.1f} KB" for k, v in result["bytes_per_view"].items()))
    print(f"batches alive at most: {result['batches_alive_most']} (bound {result['batches_alive_bound']})")
    for name in ("measured", "imagenet_jpegs"):
        r = result[name]
        print(f"{name:<15} view {r['bytes_per_view'] / 1e3:6.1f} KB, batch {r['batch_bytes'] / 1e6:6.1f} MB, "
              f"pinned per process {r['pinned_per_process'] / 1e9:.2f} GB (bound {r['pinned_per_process_bound'] / 1e9:.2f}),"
              f" per 8-process node <= {r['pinned_per_node_bound'] / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
