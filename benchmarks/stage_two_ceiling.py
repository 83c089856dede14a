"""Stage two's ceiling: how fast its host side would feed a fast GPU, measured without one.

The real stage-two data path (`EpochPlanner` epoch order, one `PlannedBatches` loader across
epochs, `CachedBatches` batch assembly from a zarr cache, the step's rendering and
`decode_batch` dequantization on the compute device) with the model step replaced by an instant
consumer. The cache holds ViT-B/16 int8/uint8 targets (k=15) of ~500x375 photo JPEGs, written by
stage one's own loop from a random-init ViT-B's targets replayed (`stage_one_ceiling`).

Rows, each with 1 and 2 loader workers, over the same JPEGs in the same run:

- MAE's online loader, the field's reference: torchvision ``ImageFolder`` + RandomResizedCrop(224,
  scale (0.2, 1), bicubic) + flip + ToTensor + Normalize, batches of `--batch`;
- pil: the workers decode and render (``data.loader=pil``), the targets dequantized on the device;
- dali: the workers read the files, DALI renders the views on the device (``data.loader=dali``;
  its CPU graph here, ``mixed`` with ``--device cuda``), then dequantization;
- host side: the dali path with the device's work replayed as instant, and all the host's work
  around it measured: the workers' reading and batch assembly (collation), the copy of each batch
  into pinned memory (``pin_memory``; on a machine without CUDA, where nothing can be pinned, the
  same bytes copied into a new buffer in the same threads: the memcpy of pinning, without the
  page-locking that torch's caching host allocator does once per block), the copies to the
  device (none on the CPU), and feeding DALI as the renderer does: `render_dali.graph_feeds`, one
  ``feed_input`` per input and the graph's ``run`` call, into a graph with the renderer's inputs
  that passes them through (DALI's host side of a run without its decoding and resizing). What it
  leaves out: the host's share of DALI's ``mixed`` decoding (nvJPEG's Huffman stage), which only
  a GPU run measures (benchmarks/gpu.sh's ceiling-two part, its "dali" rows).

Columns: views/s (wall), CPU us per view (main process, its DALI threads and the loader workers
together), views/s per core (1e6 / CPU us), the wait for the first batch of the second epoch
against the median wait (workers persist across epochs). The JSON records the 1-minute load
average before and after (the machine may be shared). Run:

    python benchmarks/stage_two_ceiling.py --repeats 3 --out benchmarks/results/stage_two_ceiling.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cards import device_record  # noqa: E402
from benchmarks.stage_one_ceiling import ARCHS, cache_meta, photo_jpegs, record_targets, replay  # noqa: E402
from tec_pipeline.cache_targets.loop import compute_shards  # noqa: E402
from tec_pipeline.base_targets import load_base  # noqa: E402
from tec_pipeline.cache.codecs import decode_batch  # noqa: E402
from tec_pipeline.cache.store import create_cache, open_cache  # noqa: E402
from tec_pipeline.cache.fidelity import INT8_FEAT_REL_RMS, UINT8_ATTN_KL  # noqa: E402
from tec_pipeline.cache_targets.drift import drift_sample, targets_drift  # noqa: E402
from tec_pipeline.cache_targets.processes import process_state  # noqa: E402
from tec_pipeline.config import load_config  # noqa: E402
from tec_pipeline.cache_targets.view_dataset import ViewDataset  # noqa: E402
from tec_pipeline.render import open_renderer, render_files, unpack_files  # noqa: E402
from tec_pipeline.train.batches import CachedBatches  # noqa: E402
from tec_pipeline.train.batches import cache_image_source  # noqa: E402
from tec_pipeline.train.loader import PlannedBatches, batch_loader  # noqa: E402
from tec_pipeline.train.loader import EpochPlanner  # noqa: E402
from tec_pipeline.train.batches import reader_shards, valid_mask  # noqa: E402
from tec_pipeline.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

GOALS = {"host side": ("cpu_us", 200.0), "dali": ("vs_mae", 1.5), "pil": ("vs_mae", 1.0)}


def make_cache(args, source, tmp: Path, recorded: dict, compress: str) -> str:
    """A ViT-B/16 int8/uint8 cache of the photos, `--views` views each, chunks through `compress`,
    by stage one's loop from the `recorded` targets."""
    dataset = ViewDataset(source, 0, args.views, args.img_size, (0.2, 1.0))
    meta = cache_meta(args, source, replay(recorded, 1, args.views), "int8/uint8", len(source), compress)
    url = str(tmp / f"cache-{compress}.zarr")
    writer = create_cache(url, meta, overwrite=True)
    targets = replay(recorded, args.batch // args.views, args.views)
    cfg = load_config(None, [f"data.views={args.views}", f"data.batch_size={args.batch}", "data.num_workers=1",
                             f"cache.images_per_shard={args.shard_images}"])
    compute_shards(cfg, writer, dataset, lambda v: {n: t[:v.shape[0]] for n, t in targets.items()},
                   list(range(writer.num_shards)), process_state())
    writer.finalize({})
    return url


INPUTS = {"encoded": "UINT8", "anchor": "INT32", "shape": "INT32", "start": "FLOAT", "end": "FLOAT", "flip": "INT32"}


def feed_graph(batch: int, executor: str = "dynamic"):
    """A DALI graph with `render_dali.view_graph`'s inputs that passes them through: feeding and
    running it is DALI's host work of a run, without decoding or resizing. `executor` "dynamic" is
    the renderer's (inputs given to `run`); "default" is DALI's older executor, run synchronously
    (one `feed_input` per input, then `run`), as the renderer ran before, for comparison."""
    from nvidia.dali import fn, pipeline_def, types

    settings = {"exec_dynamic": True} if executor == "dynamic" else {"exec_async": False, "exec_pipelined": False}

    @pipeline_def(prefetch_queue_depth=1, **settings)
    def passthrough():
        return tuple(fn.external_source(name=n, dtype=getattr(types, t)) for n, t in INPUTS.items())

    graph = passthrough(batch_size=batch, num_threads=1, device_id=None)
    graph.build()
    return graph


class HostViews:
    """The host's part of rendering on the device: the graph's feeds, fed to a pass-through DALI
    graph and run; the device's decode and render replayed as instant (one preallocated batch of
    views), and the targets' copies to the device (no dequantization)."""

    def __init__(self, batch: int, size: int, device: torch.device, executor: str = "dynamic"):
        from tec_pipeline.render_dali import graph_feeds

        self.feeds, self.size, self.device = graph_feeds, size, device
        self.executor, self.graph = executor, feed_graph(batch, executor)
        self.views = torch.zeros(batch, 3, size, size, dtype=torch.uint8, device=device)

    def __call__(self, batch: dict) -> torch.Tensor:
        feeds = self.feeds(unpack_files(batch), batch["crop"].numpy(), self.size)
        if self.executor == "dynamic":
            self.graph.run(**feeds)
        else:
            for name, data in feeds.items():
                self.graph.feed_input(name, data)
            self.graph.run()
        for name, tensor in batch.items():  # the targets' copies to the device, as the step's decode_batch
            if name not in ("files", "file_ends"):
                tensor.to(self.device, non_blocking=True)
        return self.views[:len(batch["crop"])]


class CopiedBatches:
    """Where nothing can be pinned (no CUDA): each batch copied into new buffers by the thread that
    made it, the memcpy that ``pin_memory`` does there. Each thread's copy has its own maker."""

    def __init__(self, inner):
        self.inner = inner

    def __copy__(self):
        return CopiedBatches(copy.copy(self.inner))

    def expect(self, images, views) -> None:
        self.inner.expect(images, views)

    def __call__(self, images, views) -> dict:
        return {k: torch.empty_like(v).copy_(v) for k, v in self.inner(images, views).items()}


def cached_batches(args, url: str, path: str, workers: int, device: torch.device):
    """Stage two's loader over `--epochs` epochs, and what the step does to a batch on `device`."""
    reader = open_cache(url)
    source = cache_image_source(reader)
    make = CachedBatches(reader, source, args.img_size, args.k_max + 1, buffer_shards=2, files_only=path != "pil")
    if path == "host side" and device.type != "cuda":
        make = CopiedBatches(make)
    per_epoch = reader.num_images // args.batch  # one view per image and epoch (cycle)
    planner = EpochPlanner(reader_shards(reader), valid_mask(reader), 0, 2, reader.views, "cycle", args.batch, 1, 0,
                           per_epoch)
    loader = batch_loader(PlannedBatches(planner, per_epoch, make, 0, args.epochs * per_epoch), workers,
                          pin_memory=device.type == "cuda", threads=path != "pil")
    if path == "host side":
        return loader, per_epoch, HostViews(args.batch, args.img_size, device, args.dali_executor)
    renderer = open_renderer("dali", args.img_size, device, args.batch, workers) if path == "dali" else None

    def step(batch: dict) -> torch.Tensor:
        images = (batch["images"].to(device, non_blocking=True) if renderer is None
                  else render_files(renderer, batch, batch["crop"].numpy(), 1)[0])
        decode_batch(batch, device)
        return images

    return loader, per_epoch, step


def mae_loader(args, root: Path, workers: int):
    """MAE's pre-training loader (its main_pretrain.py transform and DataLoader), on the same JPEGs:
    a new DataLoader iteration, so new workers, every epoch."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=args.batch,
                                         num_workers=workers, drop_last=True)
    return (batch for _ in range(args.epochs) for batch in loader), len(loader), lambda batch: batch[0]


def cpu_seconds() -> float:
    """This process's CPU time (its threads) plus that of its finished children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def consume(batches, per_epoch: int, step, device: torch.device) -> dict:
    """Every batch through `step`: views/s, CPU us per view (the workers', reaped when their loader
    ends, included), and the time per batch at the second epoch's start against the median."""
    cpu0 = cpu_seconds()
    start = last = time.perf_counter()
    views, times = 0, []
    for batch in batches:
        views += step(batch).shape[0]
        now = time.perf_counter()
        times.append(now - last)
        last = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    return {"views_per_s": views / seconds, "cpu_us": cpu / views * 1e6, "views": views,
            "epoch_start_ms": times[per_epoch] * 1e3 if len(times) > per_epoch else float("nan"),
            "median_batch_ms": statistics.median(times) * 1e3}


def measure(args, url: str, photos: Path, path: str, workers: int, device: torch.device) -> dict:
    """One pass of `path` with `workers` loader workers over `--epochs` epochs."""
    if path == "MAE online":
        batches, per_epoch, step = mae_loader(args, photos, workers)
    else:
        loader, per_epoch, step = cached_batches(args, url, path, workers, device)
        batches = iter(loader)
    return consume(batches, per_epoch, step, device)


def rows_of(args) -> list[tuple[str, str]]:
    """(path, cache.compress) of each row: the host side on every ``--compress``, the others on the first."""
    return [(path, c) for path in args.paths
            for c in (args.compress if path == "host side" else args.compress[:1])]


def repeated(fn, repeats: int) -> dict:
    """Median of each measure over `repeats` runs, and the spread of views/s and CPU us."""
    runs = [fn() for _ in range(repeats)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    for key in ("views_per_s", "cpu_us"):
        out[f"{key}_spread"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
    return {**out, "runs": runs}


def renderer_drift(args, source, device: torch.device) -> list[dict]:
    """How far a random-init ViT-B/16's targets move between renderers on the same 16 photo views,
    in inspect's units (feature relative RMS, attention KL at tau = 1.8): PIL against DALI's CPU
    graph, and on CUDA DALI's CPU graph against its ``mixed`` one."""
    meta = {"img_size": args.img_size, "k_max": args.k_max, "last_layers": 2, "compute_dtype": "fp32", "seed": 0,
            "scale": [0.2, 1.0], "identity": {"data": {"loader": "pil"}}}
    files, crops = drift_sample(source, meta, 16)
    encoded = [np.frombuffer(f, np.uint8) for f in files]
    cpu = torch.device("cpu")
    pairs = [("pil", cpu, "dali", cpu)] + ([("dali", cpu, "dali", device)] if device.type == "cuda" else [])
    rows = []
    for a, da, b, db in pairs:
        base = load_base(ARCHS["vit_b16"], None, args.img_size, seed=0).to(da)
        drift = targets_drift(base, meta, encoded, crops, open_renderer(a, args.img_size, da, len(files)),
                              open_renderer(b, args.img_size, db, len(files)))
        rows.append({"renderers": f"{a} ({da.type}) vs {b} ({db.type})", **drift,
                     "int8_feat_rel_rms": INT8_FEAT_REL_RMS, "uint8_attn_kl": UINT8_ATTN_KL})
    return rows


def device_work(args, url: str) -> dict:
    """CPU us per view of what a GPU would do instead, on one batch: dequantizing its targets, and
    rendering its views with PIL (host decode + resize) or DALI's CPU graph."""
    reader = open_cache(url)
    make = CachedBatches(reader, cache_image_source(reader), args.img_size, args.k_max + 1, 2, files_only=True)
    n = min(args.batch, reader.num_images)
    batch = make(np.arange(n), np.zeros(n, dtype=np.int64))
    crops = batch["crop"].numpy()
    cpu = torch.device("cpu")
    work = {"dequantize": lambda: decode_batch(batch, cpu)}
    for name in ("pil", "dali"):
        renderer = open_renderer(name, args.img_size, cpu, n)
        work[f"render {name}"] = lambda r=renderer: render_files(r, batch, crops, 1)
    out = {}
    for name, fn in work.items():
        fn()  # warm-up
        times = []
        for _ in range(3):
            start = time.process_time()
            fn()
            times.append((time.process_time() - start) / n * 1e6)
        out[name] = statistics.median(times)
    return out


def goals(rows: list[dict]) -> None:
    """Per core: host side <= 200 us per view, dali >= 1.5x and pil >= 1.0x MAE's views/s per core."""
    for r in rows:
        r["per_core"] = 1e6 / r["cpu_us"]
        mae = next((m for m in rows if m["path"] == "MAE online" and m["workers"] == r["workers"]), None)
        r["vs_mae"] = r["per_core"] / mae["per_core"] if mae else float("nan")
        if r["path"] in GOALS and (mae or GOALS[r["path"]][0] == "cpu_us"):
            key, bound = GOALS[r["path"]]
            r["goal"] = f"<= {bound:.0f} us" if key == "cpu_us" else f">= {bound}x MAE"
            r["met"] = bool(r[key] <= bound) if key == "cpu_us" else bool(r[key] >= bound)


def print_table(result: dict) -> None:
    a = result["args"]
    print(f"\nstage-two ceiling on {result['machine']} ({result['cores']} cores, device {a['device']}); "
          f"{a['images']} photo JPEGs, ViT-B/16 int8/uint8 targets, batch {a['batch']}, {a['epochs']} epochs, "
          f"{a['repeats']} run(s): median (min-max); 1-minute load average {result['load_average'][0][0]:.2f} before, "
          f"{result['load_average'][-1][0]:.2f} after")
    print(f"{'path':<12}{'chunks':<7}{'workers':>8}{'views/s':>9}{'spread':>12}{'CPU us/view':>13}{'spread':>12}"
          f"{'per core':>9}{'x MAE':>7}{'epoch start ms':>16}{'median ms':>11}  goal")
    for r in result["rows"]:
        goal = f"{r['goal']}: {'met' if r['met'] else 'NOT met'}" if "goal" in r else ""
        vs, cs = r["views_per_s_spread"], r["cpu_us_spread"]
        print(f"{r['path']:<12}{r['compress']:<7}{r['workers']:>8}{r['views_per_s']:>9.0f}{f'{vs[0]:.0f}-{vs[1]:.0f}':>12}"
              f"{r['cpu_us']:>13.0f}{f'{cs[0]:.0f}-{cs[1]:.0f}':>12}{r['per_core']:>9.0f}{r['vs_mae']:>7.2f}"
              f"{r['epoch_start_ms']:>16.1f}{r['median_batch_ms']:>11.1f}  {goal}")
    work = ", ".join(f"{name} {us:.0f}" for name, us in result["device_work_us"].items())
    print(f"device work on the CPU, us per view (one batch, median of 3): {work}")
    for d in result["drift"]:
        print(f"targets drift, {d['renderers']}: feature rel RMS {d['feat_rel_rms']:.2%}, attention KL "
              f"{d['attn_kl']:.1e} over {d['views']} views (int8's own: {d['int8_feat_rel_rms']:.2%}, "
              f"{d['uint8_attn_kl']:.1e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="photo JPEGs (~500x375)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--views", type=int, default=2, help="views per image in the cache")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shard-images", type=int, default=128)
    p.add_argument("--k-max", type=int, default=15)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--paths", nargs="+", default=["MAE online", "pil", "dali", "host side"])
    p.add_argument("--compress", nargs="+", default=["zstd", "none"], choices=["zstd", "lz4", "none"],
                   help="cache.compress of the caches: the host side runs on each, pil and dali on the first")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--dali-executor", choices=["dynamic", "default"], default="dynamic",
                   help="the host side's DALI executor: the renderer's (dynamic), or the older one for comparison")
    p.add_argument("--drift", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the targets' drift between renderers (a ViT-B forward per view)")
    p.add_argument("--device", default="cpu", help="the compute device (cpu, cuda)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stage_two_ceiling.json")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)  # the CPU as "device" gets one core; the loader workers the others
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.processor() or platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "load_average": [os.getloadavg()],
              **device_record(device.type), "rows": []}
    with tempfile.TemporaryDirectory(prefix="tec-ceiling-two-") as tmp:
        tmp = Path(tmp)
        source = photo_jpegs(tmp / "photos", args.images)
        dataset = ViewDataset(source, 0, args.views, args.img_size, (0.2, 1.0))
        recorded = record_targets(ARCHS["vit_b16"], dataset, 2, args.k_max, torch.device("cpu"))
        urls = {c: make_cache(args, source, tmp, recorded, c) for c in args.compress}
        for workers in args.workers:
            for path, compress in rows_of(args):  # interleaved, so a slow spell of the machine hits every path
                r = repeated(lambda: measure(args, urls[compress], tmp / "photos", path, workers, device), args.repeats)
                result["rows"].append({"path": path, "compress": compress if path != "MAE online" else "",
                                       "workers": workers, **r})
        result["device_work_us"] = device_work(args, urls[args.compress[0]])
        result["drift"] = renderer_drift(args, source, device) if args.drift else []
    result["load_average"].append(os.getloadavg())  # before and after
    goals(result["rows"])
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
