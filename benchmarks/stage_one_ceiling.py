"""Stage one's ceiling: how fast its host side would let a fast GPU run, measured without one.

The real stage-one loop (`tec_pipeline.cache_targets.loop.compute_shards`: loader, encoding on the
compute device, shard assembly, writer pool, durable shards) with the base forward replaced by an
instant producer of realistic targets on the compute device. The targets are recorded once per run from a
real random-init base on the benchmark's photo views (value distributions as a base gives them;
every view is compressed on its own, so replaying them costs what new views would). The images are
~500x375 JPEGs cut from scikit-learn's sample photographs (random crops and flips).

Rows, views/s and MB/s (storage bytes; source JPEG bytes for the loaders):

(a) the loader alone, one worker: decode once, render 8 views per image;
(b) the writer alone, 1 and 2 writer threads: targets on the device -> encoding there -> host ->
    shard assembly -> zstd + durable files + marker; shard files written with O_DIRECT or
    buffered (``cache.direct_io``); and "host side", the same with the device's encoding instant
    (its output replayed into the rows, the device-to-host copy a GPU run makes): what the host
    does behind a GPU, where the encoding is a small part of the device's time per batch;
    disk: a plain sequential write + fsync of as many bytes, the ceiling (b) can reach;
(c) the whole loop, one loader worker (loader + encoding + writers), cache-targets' own code, and
    its "host side" with the encoding instant as in (b);
(d) stage two's loader, one worker: decode + render + targets to tensors, over (c)'s cache.

On a CPU-only machine the CPU is the compute device: the encoding then takes CPU time that a GPU
would take instead (it is timed alone as "encode on the device"). Run:

    python benchmarks/stage_one_ceiling.py --repeats 3 --out benchmarks/results/stage_one_ceiling.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import bench_loader  # noqa: E402
from tec_pipeline.cache_targets.loop import compute_shards  # noqa: E402
from tec_pipeline.base_targets import load_base, view_targets  # noqa: E402
from tec_pipeline.cache import assemble  # noqa: E402
from tec_pipeline.cache.assemble import ShardWriterPool, default_writer_threads  # noqa: E402
from tec_pipeline.cache.encode import BatchChecks, empty_shard, encode_views, read_checks  # noqa: E402
from tec_pipeline.cache.schema import array_specs  # noqa: E402
from tec_pipeline.cache.store import create_cache  # noqa: E402
from tec_pipeline.config import ViTArch, load_config  # noqa: E402
from tec_pipeline.data.sources import ImageFolderSource  # noqa: E402
from tec_pipeline.cache_targets.view_dataset import ViewDataset, shard_batches, view_loader  # noqa: E402
from tec_pipeline.cache_targets.processes import process_state  # noqa: E402

ARCHS = {"vit_b16": ViTArch("vit_base_patch16_224"), "vit_l16": ViTArch("vit_large_patch16_224"),
         "tiny": ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)}
STORAGE = {"int8/uint8": ("int8", "uint8"), "float16": ("float16", "float16")}
GOALS = {"int8/uint8": 4000, "float16": 2500}  # (b) with one writer thread, ViT-B/16, on 2 cores


# ---------------------------------------------------------------- data
def photo_jpegs(root: Path, n: int, seed: int = 0) -> ImageFolderSource:
    """`n` ~500x375 JPEGs (quality 90): random crops, scaled and flipped, of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640 x 427 each
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        w = int(rng.integers(400, 560))
        h = w * 3 // 4
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        crop = photo.crop((left, top, left + w, top + h)).resize((500, 375), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        crop.save(root / f"class{i % 4}" / f"{i:06d}.jpg", quality=90)
    return ImageFolderSource(root)


def record_targets(arch: ViTArch, dataset: ViewDataset, images: int, k_max: int, device) -> dict:
    """Targets of a real random-init base on `images` x views photo views, flattened to (R, ...)."""
    base = load_base(arch, None, dataset.img_size, seed=0).to(device)
    batch = next(iter(view_loader(dataset, [list(range(images))], num_workers=0)))
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # a slow fp32 forward: every core
    targets = view_targets(base, batch["views"], 2, k_max, device, None)
    torch.set_num_threads(threads)
    return {name: t.flatten(0, 1) for name, t in targets.items()}


def replay(recorded: dict, images: int, views: int) -> dict:
    """(images, views) targets on the device, tiled from the recorded views."""
    pick = torch.arange(images * views, device=recorded["feat"].device) % len(recorded["feat"])
    return {name: t[pick].view(images, views, *t.shape[1:]) for name, t in recorded.items()}


def cache_meta(args, source: ImageFolderSource, targets: dict, storage: str, images: int, compress: str) -> dict:
    """Cache metadata of the benchmark's shapes (chunks through `compress`), with what stage two's
    loader reads (source, crops)."""
    feat_dtype, attn_dtype = STORAGE[storage]
    _, V, L, C = targets["feat"].shape
    return {"store": "zarr", "num_images": images, "views": V, "num_patches": L, "feat_dim": C,
            "heads": targets["attn"].shape[3], "k_max": args.k_max, "images_per_shard": args.shard_images,
            "feat_dtype": feat_dtype, "attn_dtype": attn_dtype, "compress": compress, "zstd_level": 1,
            "img_size": args.img_size,
            "seed": 0, "scale": [0.2, 1.0], "identity": {"benchmark": "stage_one_ceiling"},
            "source": {"kind": "imagefolder", "path": str(source.root), "num_images": len(source),
                       "fingerprint": source.fingerprint()}}


# ---------------------------------------------------------------- the measurements
def loader_rate(dataset: ViewDataset, args) -> dict:
    """(a) views/s of the view loader with one worker (start-up included, as in (c))."""
    start, views = time.perf_counter(), 0
    batches = shard_batches([range(len(dataset))], args.batch // args.views)
    for batch in view_loader(dataset, batches, num_workers=1):
        views += batch["views"].shape[0] * batch["views"].shape[1]
    seconds = time.perf_counter() - start
    jpeg = sum(p.stat().st_size for p in Path(dataset.source.root).rglob("*.jpg"))
    return {"views_per_s": views / seconds, "mb_per_s": jpeg / 1e6 / seconds}


def fake_batch(first: int, images: int, views: int) -> dict:
    """A view-loader batch's bookkeeping (the writer alone needs no pixels)."""
    return {"index": torch.arange(first, first + images), "valid": torch.ones(images, dtype=torch.bool),
            "crops": torch.zeros(images, views, 5, dtype=torch.int32), "label": torch.zeros(images, dtype=torch.int64),
            "error": [""] * images, "raw": [b""] * images}


@contextmanager
def instant_encode(meta: dict, recorded: dict, per_batch: int):
    """Within the block, the shard assembler's ``encode_views`` is instant: one batch's encoded
    rows and measured errors, computed once, are copied into each batch's rows (the device-to-host
    copy of storage-dtype bytes, all the host does for the encoding when the device is a GPU)."""
    V = int(meta["views"])
    done = {name: a for name, a in empty_shard(array_specs(meta), per_batch, V).items()
            if name not in ("crop", "valid", "label")}
    checks = encode_views(replay(recorded, per_batch, V), torch.ones(per_batch, dtype=torch.bool),
                          np.ones((per_batch, V), bool), meta["feat_dtype"], meta["attn_dtype"], range(per_batch), done)
    errors = torch.from_numpy(read_checks([checks])[0])

    def replayed(targets, valid, measure, feat_dtype, attn_dtype, images, out, pq=None):
        for name, rows in out.items():
            np.copyto(rows, done[name][:len(rows)])
        return BatchChecks(images, V, errors[:int(measure.sum())])

    real, assemble.encode_views = assemble.encode_views, replayed
    try:
        yield
    finally:
        assemble.encode_views = real


def writer_rate(meta: dict, recorded: dict, threads: int, per_batch: int, folder: Path, io: str,
                encode: str) -> dict:
    """(b) views/s from targets on the device to durable shards, `threads` writer threads, shard
    files written with O_DIRECT (`io` "direct", ``cache.direct_io``) or through the page cache;
    `encode` "instant" replays the device's encoding (``instant_encode``)."""
    writer = create_cache(str(folder / f"writer-{threads}.zarr"), meta, overwrite=True)
    writer.direct_io = io == "direct"
    V = int(meta["views"])
    targets = replay(recorded, per_batch, V)
    with instant_encode(meta, recorded, per_batch) if encode == "instant" else nullcontext():
        pool = ShardWriterPool(writer, threads)
        start, cpu = time.perf_counter(), time.thread_time()
        for shard in range(writer.num_shards):
            assembled = pool.assembler(shard, keep_raw=False)
            for batch in shard_batches([writer.shard_range(shard)], per_batch):
                assembled.add(fake_batch(batch[0], len(batch), V), {k: t[:len(batch)] for k, t in targets.items()})
            pool.put(assembled)
        device_cpu = time.thread_time() - cpu
        pool.close()
    seconds, views = time.perf_counter() - start, meta["num_images"] * V
    data = data_file_bytes(folder / f"writer-{threads}.zarr")
    return {"views_per_s": views / seconds, "mb_per_s": pool.bytes_written / 1e6 / seconds,
            "bytes": pool.bytes_written, "data_file_bytes": data, "bytes_per_view": pool.bytes_written / views,
            # CPU time per view: the main thread (device work when the CPU is the device, assembly,
            # the queue) and the writer threads (zstd, copies, system calls; fsync waits excluded)
            "main_cpu_us_per_view": device_cpu / views * 1e6, "writer_cpu_us_per_view": pool.cpu_seconds / views * 1e6}


def data_file_bytes(root: Path) -> int:
    """Bytes of a zarr cache's shard files on disk (not its metadata, arrays' zarr.json or markers)."""
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and p.parent.name != "_done" and p.name not in ("zarr.json", "tec_cache.json"))


def encode_rate(meta: dict, recorded: dict, per_batch: int) -> dict:
    """Views/s of the checks and encoders alone on the compute device, into host arrays (a GPU's
    work; the CPU's here), without the error sample."""
    V = int(meta["views"])
    targets = replay(recorded, per_batch, V)
    out = {name: a for name, a in empty_shard(array_specs(meta), per_batch, V).items() if name not in ("crop", "valid", "label")}
    start = time.perf_counter()
    for _ in range(4):
        encode_views(targets, torch.ones(per_batch, dtype=torch.bool), np.zeros((per_batch, V), bool),
                     meta["feat_dtype"], meta["attn_dtype"], range(per_batch), out)
    return {"views_per_s": 4 * per_batch * V / (time.perf_counter() - start)}


def disk_rate(folder: Path, nbytes: int) -> dict:
    """MB/s of a plain sequential write + fsync of `nbytes` (random bytes, 8 MiB writes)."""
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(folder / "disk.bin", "wb") as f:
        for _ in range(max(1, -(-nbytes // len(block)))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    written = (folder / "disk.bin").stat().st_size
    (folder / "disk.bin").unlink()
    return {"mb_per_s": written / 1e6 / seconds}


def whole_loop(args, meta: dict, dataset: ViewDataset, recorded: dict, url: str) -> dict:
    """(c) views/s of cache-targets' loop (`compute_shards`), one loader worker, instant forward."""
    cfg = load_config(None, [f"data.views={args.views}", f"data.batch_size={args.batch}", "data.num_workers=1",
                             f"cache.images_per_shard={args.shard_images}"])
    writer = create_cache(url, meta, overwrite=True)
    targets = replay(recorded, args.batch // args.views, args.views)
    device = recorded["feat"].device

    def forward(views):  # the base forward, instant: the batch's views go to the device, targets come back
        views.to(device, non_blocking=True)
        return {name: t[:views.shape[0]] for name, t in targets.items()}

    counts = compute_shards(cfg, writer, dataset, forward, list(range(writer.num_shards)), process_state())
    return {"views_per_s": counts["views"] / counts["loop_seconds"],
            "mb_per_s": counts["bytes"] / 1e6 / counts["loop_seconds"], "bytes": counts["bytes"]}


def stage_two_loader(args, url: str) -> dict:
    """(d) views/s of stage two's loader, one worker: decode + render + targets to tensors."""
    rate = bench_loader(url, SimpleNamespace(img_size=args.img_size, k=args.k_max, batch=args.batch), True, 1)
    return {"views_per_s": rate}


# ---------------------------------------------------------------- runs, table
def repeated(fn, repeats: int) -> dict:
    """`fn()`'s measures over `repeats` runs: the median of each, the spread of views/s (or MB/s)."""
    runs = [fn() for _ in range(repeats)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    key = "views_per_s" if "views_per_s" in runs[0] else "mb_per_s"
    out["spread"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
    out["runs"] = runs
    return out


def measure_arch(args, name: str, dataset: ViewDataset, tmp: Path) -> list[dict]:
    """Rows (b), disk and the device encoding of one architecture per ``cache.compress``; (c) and
    (d) at int8/uint8 with the first setting of ``--compress``."""
    recorded = record_targets(ARCHS[name], dataset, args.record_images, args.k_max, args.device)
    rows = []
    for compress in args.compress:
        for storage in args.storage:
            meta = cache_meta(args, dataset.source, replay(recorded, 1, args.views), storage,
                              args.writer_shards * args.shard_images, compress)
            key = {"arch": name, "storage": storage, "compress": compress}
            for encode, io, threads in itertools.product(args.encode, args.io, args.writer_threads):
                r = repeated(lambda: writer_rate(meta, recorded, threads, args.batch // args.views, tmp, io, encode),
                             args.repeats)
                row = f"(b) writer, {io} I/O" if encode == "device" else f"(b) host side, {io} I/O"
                rows.append({"row": row, **key, "io": io, "encode": encode, "threads": threads, **r})
            rows.append({"row": "disk: write + fsync", **key,
                         **repeated(lambda: disk_rate(tmp, rows[-1]["bytes"]), args.repeats)})
            rows[-1]["views_per_s"] = rows[-1]["mb_per_s"] * 1e6 / rows[-2]["bytes_per_view"]
            if compress == args.compress[0] and not args.skip_encode:
                rows.append({"row": "encode on the device", **key,
                             **repeated(lambda: encode_rate(meta, recorded, args.batch // args.views), args.repeats)})
    if name == args.archs[0] and "int8/uint8" in args.storage and not args.skip_loop:
        meta = cache_meta(args, dataset.source, replay(recorded, 1, args.views), "int8/uint8", len(dataset),
                          args.compress[0])
        url = str(tmp / "whole.zarr")
        key = {"arch": name, "storage": "int8/uint8", "compress": args.compress[0]}
        for encode in args.encode:
            with instant_encode(meta, recorded, args.batch // args.views) if encode == "instant" else nullcontext():
                r = repeated(lambda: whole_loop(args, meta, dataset, recorded, url), args.repeats)
            row = "(c) whole loop, 1 loader worker" if encode == "device" else "(c) host side, 1 loader worker"
            rows.append({"row": row, **key, "encode": encode, "threads": default_writer_threads(), **r})
        rows.append({"row": "(d) stage two loader, 1 worker", **key,
                     **repeated(lambda: stage_two_loader(args, url), args.repeats)})
    return rows


def goals(rows: list[dict], io: str) -> None:
    """Mark each row a goal applies to: (b) 1 thread on ViT-B/16 with `io` (or 0.9 x the disk), (c) vs (a)."""
    loader = next(r for r in rows if r["row"].startswith("(a)"))["views_per_s"]
    for r in rows:
        if (r["row"].startswith("(b)") and r["io"] == io and r["encode"] == "device" and r["threads"] == 1
                and r["arch"] == "vit_b16"):
            disk = next(d for d in rows if d["row"].startswith("disk")
                        and all(d[k] == r[k] for k in ("arch", "storage", "compress")))
            r["goal"] = min(GOALS[r["storage"]], 0.9 * disk["views_per_s"])
        elif r["row"].startswith("(c)"):
            r["goal"] = 0.9 * loader
        if "goal" in r:
            r["met"] = bool(r["views_per_s"] >= r["goal"])


def print_table(result: dict) -> None:
    a = result["args"]
    print(f"\nstage-one ceiling on {result['machine']} ({result['cores']} cores, device {a['device']}); "
          f"{a['views']} views/image, {a['batch']} views/batch, shards of {a['shard_images']} images, "
          f"{a['repeats']} run(s): median (min-max)")
    print(f"{'row':<34}{'arch':<9}{'storage':<12}{'chunks':<7}{'thr':>4}{'views/s':>9}{'spread':>13}{'MB/s':>7}"
          f"{'CPU us/view main+writer':>25}  goal")
    for r in result["rows"]:
        spread = f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f}" if "views_per_s" in r["runs"][0] else ""
        goal = f">= {r['goal']:.0f}: {'met' if r['met'] else 'NOT met'}" if "goal" in r else ""
        mb = f"{r['mb_per_s']:.0f}" if "mb_per_s" in r else ""
        cpu = f"{r['main_cpu_us_per_view']:.0f} + {r['writer_cpu_us_per_view']:.0f}" if "main_cpu_us_per_view" in r else ""
        print(f"{r['row']:<34}{r.get('arch', ''):<9}{r.get('storage', ''):<12}{r.get('compress', ''):<7}"
              f"{r.get('threads', ''):>4}"
              f"{r['views_per_s']:>9.0f}{spread:>13}{mb:>7}{cpu:>25}  {goal}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["vit_b16", "vit_l16"], choices=sorted(ARCHS))
    p.add_argument("--storage", nargs="+", default=list(STORAGE), choices=list(STORAGE))
    p.add_argument("--images", type=int, default=256, help="photo JPEGs for (a), (c), (d)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="views per batch")
    p.add_argument("--shard-images", type=int, default=128, help="images per shard (cache-targets: 256)")
    p.add_argument("--writer-shards", type=int, default=4, help="shards written per (b) measurement")
    p.add_argument("--writer-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--compress", nargs="+", default=["zstd"], choices=["zstd", "lz4", "none"],
                   help="cache.compress settings measured in (b); (c) and (d) use the first")
    p.add_argument("--io", nargs="+", default=["direct", "buffered"], choices=["direct", "buffered"],
                   help="how (b) writes shard files (cache.direct_io); the goal is checked on the first")
    p.add_argument("--encode", nargs="+", default=["device", "instant"], choices=["device", "instant"],
                   help="(b) with the encoding on the compute device, and/or instant (host side only)")
    p.add_argument("--skip-encode", action="store_true", help="leave out the device-encoding row")
    p.add_argument("--skip-loop", action="store_true", help="leave out (c) and (d)")
    p.add_argument("--k-max", type=int, default=15)
    p.add_argument("--record-images", type=int, default=2, help="images whose views' real targets are replayed")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu", help="the compute device the targets live on (cpu, cuda)")
    p.add_argument("--dir", type=Path, default=None, help="where the caches are written (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stage_one_ceiling.json")
    args = p.parse_args()
    args.device = torch.device(args.device)
    torch.set_num_threads(1)  # the CPU as "device" gets one core; loaders and writers the others
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.processor() or platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="tec-ceiling-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        source = photo_jpegs(tmp / "photos", args.images)
        dataset = ViewDataset(source, 0, args.views, args.img_size, (0.2, 1.0))
        result["rows"] = [{"row": "(a) loader, 1 worker", **repeated(lambda: loader_rate(dataset, args), args.repeats)}]
        for name in args.archs:
            result["rows"] += measure_arch(args, name, dataset, tmp)
    goals(result["rows"], args.io[0])
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
