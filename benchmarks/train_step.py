"""Stage two speed: a training step from the cache vs online, the loaders alone, and data wait.

Measures, on whatever device is here (CPU by default):

1. **step time**: one TEC step (new-model forward, both losses, backward, AdamW) with the
   targets read from memory (what the cache gives) vs. online (base forward + target
   enhancement + the same step). Default: ViT-B/16 new model + ViT-B/16 base at 224, batch 8.
2. **loader alone**: views/s of the cache reader (targets only: `CachedBatches(render=False)`,
   batches in the stored dtypes as training gets them; and the same plus dequantizing to
   float32 on the CPU, `decode_batch`) and of the full loader (targets + JPEG decode +
   crop/resize render), over a synthetic zarr cache of the same shapes written through the
   store API.
3. **data wait**: the fraction of a short `run_train` spent waiting for the loader
   (from its log.jsonl), with `--workers` loader processes.

Example (smaller model: note it in any report):
    python benchmarks/train_step.py --arch vit_small_patch16_224 --base-arch vit_small_patch16_224 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tec_pipeline.stages.train import run_train  # noqa: E402
from tec_pipeline.cache.store import create_cache, open_cache  # noqa: E402
from tec_pipeline.config import Config, TargetConfig, TrainConfig, ViTArch  # noqa: E402
from tec_pipeline.data.sources import ImageFolderSource  # noqa: E402
from tec_pipeline.models.base import load_base_model  # noqa: E402
from tec_pipeline.models.tec import TECModel  # noqa: E402
from tec_pipeline.step import tec_losses  # noqa: E402
from tec_pipeline.base_targets import compute_targets  # noqa: E402
from tec_pipeline.cache.codecs import decode_batch  # noqa: E402
from tec_pipeline.train.batches import CachedBatches  # noqa: E402
from tec_pipeline.train.batches import cache_image_source  # noqa: E402
from tec_pipeline.train.loader import epoch_loader  # noqa: E402
from tec_pipeline.train.batches import reader_shards  # noqa: E402
from tec_pipeline.train.loader import epoch_order, plan_epoch, view_indices  # noqa: E402
from tec_pipeline.train.schedule import param_groups  # noqa: E402
from tec_pipeline.views import normalize, sample_view  # noqa: E402


# ---------------------------------------------------------------- 1. step time
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return times


def bench_step(args) -> dict:
    """Median seconds per step: cached targets vs online (base in the loop)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    base = load_base_model(ViTArch(name=args.base_arch), None, img_size=args.img_size).to(device)
    C, H = base.embed_dim, base.blocks[-1].attn.num_heads
    model = TECModel(ViTArch(name=args.arch, img_size=args.img_size), feat_dim=C, attn_dim=C, attn_heads=H).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    images = normalize(torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8)).to(device)
    cfg = TargetConfig(k=args.k)
    with torch.no_grad(), amp():
        cached = compute_targets(base, images, cfg.last_layers, args.k)

    def targets_now():
        with torch.no_grad(), amp():  # as stage two's online mode: base forward without grad
            return compute_targets(base, images, cfg.last_layers, args.k)

    def update(targets, step_losses=tec_losses) -> None:
        with amp():
            losses = step_losses(model, images, targets, cfg)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    t_cache = time_steps(lambda: update(cached), args.steps, args.warmup)
    t_online = time_steps(lambda: update(targets_now()), args.steps, args.warmup)
    t_base = time_steps(targets_now, args.steps, 1)
    med = statistics.median
    out = {"cache_step_s": med(t_cache), "online_step_s": med(t_online), "base_targets_s": med(t_base),
           "online_over_cache": med(t_online) / med(t_cache), "base_share_of_online": med(t_base) / med(t_online)}
    if args.compile:  # the same cached step through torch.compile (train.compile); warm-up includes compiling
        compiled = torch.compile(tec_losses, fullgraph=True)
        t_compiled = time_steps(lambda: update(cached, compiled), args.steps, args.warmup)
        out.update(compiled_cache_step_s=med(t_compiled), eager_over_compiled=med(t_cache) / med(t_compiled))
    return out


# ---------------------------------------------------------------- 2. loaders
def make_images(root: Path, n: int) -> ImageFolderSource:
    """ImageNet-like JPEGs (~500x375, smooth noise so they compress like photos)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(400, 520)), int(rng.integers(300, 400))
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(root / f"{i:05d}.jpg", quality=90)
    return ImageFolderSource(root)


def make_cache(url: str, source: ImageFolderSource, args, L: int, C: int, H: int, loader: str = "pil") -> None:
    """A synthetic cache of the benchmark's shapes (Gaussian targets, real crop params), via the store API,
    recorded as rendered by `loader` (the ``data.loader`` stage two may then render its views with)."""
    n, V, k = len(source), args.views, args.k
    meta = {"store": "zarr", "num_images": n, "views": V, "num_patches": L, "feat_dim": C, "heads": H, "k_max": k,
            "images_per_shard": args.images_per_shard, "feat_dtype": args.feat_dtype, "attn_dtype": args.attn_dtype,
            "zstd_level": 1, "img_size": args.img_size,
            "identity": {"img_size": args.img_size, "seed": 0, "benchmark": True, "data": {"loader": loader}},
            "source": {"kind": "imagefolder", "path": str(source.root), "num_images": n,
                       "fingerprint": source.fingerprint()}}
    writer = create_cache(url, meta, overwrite=True)
    rng = np.random.default_rng(0)
    for shard in range(writer.num_shards):
        r = writer.shard_range(shard)
        m = len(r)
        crops = np.stack([[sample_view(0, i, v, *source.load(i).size[::-1]).as_array() for v in range(V)] for i in r])
        writer.write_shard(shard, {
            "crop": crops, "feat": rng.standard_normal((m, V, L, C), dtype=np.float32),
            "feat_mean": rng.standard_normal((m, V, C), dtype=np.float32),
            "feat_std": np.ones((m, V, C), np.float32),
            "attn": rng.standard_normal((m, V, k + 1, H, L), dtype=np.float32) * 3,
            "topk_idx": np.stack([[rng.permutation(L)[:k] for _ in range(V)] for _ in range(m)]),
            "valid": np.ones(m, np.uint8), "label": np.zeros(m, np.int64)})
    writer.finalize({})


def bench_loader(url: str, args, render: bool, workers: int, dequantize: bool = False) -> float:
    """Views/s over one epoch of the chunk-aware loader, targets only or targets + rendered views.

    Batches carry the targets in their stored dtypes (training dequantizes them on the compute
    device); `dequantize` adds that step here, on the CPU (`decode_batch(batch, "cpu")`)."""
    reader = open_cache(url)
    source = cache_image_source(reader) if render else None
    make = CachedBatches(reader, source, args.img_size, args.k + 1, buffer_shards=2, render=render)
    order = epoch_order(reader_shards(reader), None, 0, 0, 2)
    plan = plan_epoch(order, view_indices(order, 0, 0, reader.views, "cycle"), args.batch)
    start, views = time.perf_counter(), 0
    for batch in epoch_loader(plan, make, 0, workers):
        if dequantize:
            decode_batch(batch, "cpu")
        views += len(batch["index"])
    return views / (time.perf_counter() - start)


# ---------------------------------------------------------------- 3. data wait in training
def bench_training(url: str, args, out: Path) -> dict:
    cfg = Config(seed=0, output=str(out))
    cfg.model = replace(cfg.model, arch=ViTArch(name=args.arch))
    cfg.targets = replace(cfg.targets, source="cache", k=args.k)
    cfg.data = replace(cfg.data, img_size=args.img_size, batch_size=args.batch, num_workers=args.workers)
    cfg.cache = replace(cfg.cache, path=url)
    cfg.optim = replace(cfg.optim, mixed_precision="bf16" if args.precision == "bf16" else "no")
    cfg.train = TrainConfig(max_steps=args.train_steps, checkpoint_every=10**9)
    run_train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]  # first: start-up
    return {"data_wait_fraction": statistics.mean(r["data_wait"] for r in records),
            "train_images_per_s": statistics.mean(r["images_per_s"] for r in records),
            "train_steps_measured": len(records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="new model (timm name)")
    p.add_argument("--base-arch", default="vit_base_patch16_224", help="base model (timm name)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", type=int, default=256, help="images in the synthetic cache")
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--feat-dtype", default="int8", choices=("float32", "float16", "int8"))
    p.add_argument("--attn-dtype", default="uint8", choices=("float32", "float16", "uint8"))
    p.add_argument("--workers", type=int, default=2, help="loader processes for the full loader and training")
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available; cpu hides the GPUs (also from the training part)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast of the step parts and training (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--skip", nargs="*", default=[], choices=("step", "loader", "train"))
    p.add_argument("--compile", action="store_true", help="also time the cached step compiled (torch.compile)")
    p.add_argument("--repeats", type=int, default=1, help="runs of the whole measurement: median and (min, max)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "command": " ".join(sys.argv), "device": device, "torch_threads": torch.get_num_threads(),
                 "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "runs": [],
                 "load_average": [os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "loader" not in args.skip or "train" not in args.skip:
            base = load_base_model(ViTArch(name=args.base_arch), None, img_size=args.img_size)
            L, C, H = base.patch_embed.num_patches, base.embed_dim, base.blocks[-1].attn.num_heads
            source = make_images(tmp / "images", args.images)
            make_cache(str(tmp / "cache.zarr"), source, args, L, C, H)
        for i in range(args.repeats):
            res["runs"].append(measure_once(args, str(tmp / "cache.zarr"), tmp / f"run{i}"))
            res["load_average"].append(os.getloadavg())  # after each run
            if args.out:  # as it goes: a run cut short keeps the runs it finished
                args.out.write_text(json.dumps({**res, **summarize(res["runs"])}, indent=2))
    res.update(summarize(res["runs"]))
    print_table(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


def measure_once(args, url: str, run_dir: Path) -> dict:
    """One run of every part not skipped: {"step": ..., "loader": ..., "train": ...}."""
    out = {}
    if "step" not in args.skip:
        out["step"] = bench_step(args)
        print("step:", json.dumps(out["step"]), flush=True)
    if "loader" not in args.skip:
        out["loader"] = {"targets_only_views_s_0w": bench_loader(url, args, False, 0),
                         "targets_cpu_float32_views_s_0w": bench_loader(url, args, False, 0, dequantize=True),
                         "full_views_s_0w": bench_loader(url, args, True, 0),
                         f"full_views_s_{args.workers}w": bench_loader(url, args, True, args.workers)}
        print("loader:", json.dumps(out["loader"]), flush=True)
    if "train" not in args.skip:
        out["train"] = bench_training(url, args, run_dir)
    return out


def summarize(runs: list[dict]) -> dict:
    """Each part's median over the runs (under the part's name, as one run's), and its (min, max)."""
    out: dict = {"spread": {}}
    for part in runs[0]:
        keys = runs[0][part].keys()
        out[part] = {k: statistics.median(r[part][k] for r in runs) for k in keys}
        out["spread"][part] = {k: [min(r[part][k] for r in runs), max(r[part][k] for r in runs)] for k in keys}
    return out


def pick_device(choice: str) -> str:
    """`auto` -> cuda if available; `cuda` without a GPU stops here; `cpu` hides the GPUs from torch."""
    import os

    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: run_train's Accelerator stays on CPU too
        return "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


def print_table(res: dict) -> None:
    s = res["settings"]
    print(f"\nstage-two benchmark on {res['device']} ({res['torch_threads']} threads): new {s['arch']}, "
          f"base {s['base_arch']}, {s['img_size']}px, batch {s['batch']}, {s.get('precision', 'fp32')}; "
          f"{len(res['runs'])} run(s), median (min-max); 1-minute load average "
          + ", ".join(f"{load[0]:.2f}" for load in res["load_average"]))
    names = {"cache_step_s": "step from cache (s)", "compiled_cache_step_s": "step from cache, compiled (s)",
             "eager_over_compiled": "eager / compiled", "online_step_s": "step online (s)",
             "base_targets_s": "  base forward + targets (s)", "online_over_cache": "online / cache",
             "base_share_of_online": "base share of online step"}
    rows = [(names.get(k, f"{part} {k.replace('_', ' ')}"), part, k)
            for part in ("step", "loader", "train") if part in res for k in res[part]]
    width = max(len(name) for name, _, _ in rows)
    for name, part, k in rows:
        lo, hi = res["spread"][part][k]
        print(f"  {name:<{width}}  {res[part][k]:10.3f}  ({lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
