"""Benchmark stage one: how close `cache-targets` runs to the speed of its base forward, and
whether its memory stays flat as the dataset grows.

1. Efficiency = views/s of `cache-targets` (DataLoader + forward + target enhancement +
   shard assembly + encode + write) / views/s of a bare loop over the *same* DataLoader
   running the same base forward and discarding the output (same model, batch, device).
   Both exclude setup (model build, dataset index); both include DataLoader start-up.
2. Peak RSS of a whole run over N1 and N2 images at a tiny size, each in its own process:
   buffers are per shard, so peak memory should not grow with N.

    python benchmarks/cache_targets.py --images 256 --arch vit_small_patch16_224 --batch 32 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cards import device_record  # noqa: E402
from tec_pipeline.stages.cache_targets import run_cache_targets  # noqa: E402
from tec_pipeline.base_targets import compute_dtype, compute_setting, load_base  # noqa: E402
from tec_pipeline.config import load_config  # noqa: E402
from tec_pipeline.data import open_source  # noqa: E402
from tec_pipeline.cache_targets.view_dataset import ViewDataset, shard_batches, view_loader  # noqa: E402
from tec_pipeline.models.base import base_forward  # noqa: E402
from tec_pipeline.views import normalize  # noqa: E402


def write_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` random JPEGs (smooth noise, so they compress like photos) in 4 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize(size, Image.Resampling.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def overrides(args, data: Path, cache: Path, arch: list[str]) -> list[str]:
    return arch + [f"data.path={data}", f"data.img_size={args.img_size}", f"data.views={args.views}",
                   f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                   f"cache.path={cache}", f"cache.images_per_shard={args.shard}", f"cache.k_max={args.k_max}",
                   f"cache.feat_dtype={args.feat_dtype}", f"cache.attn_dtype={args.attn_dtype}"]


def bare_loop(cfg) -> float:
    """Views/s of the DataLoader + base forward alone, output discarded."""
    source = open_source(cfg.data)
    base = load_base(cfg.base.arch, cfg.base.checkpoint, cfg.data.img_size, cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as run_cache_targets (accelerate)
    base.to(device)
    dtype = compute_dtype(compute_setting(cfg.base.compute_dtype, device))  # as run_cache_targets
    dataset = ViewDataset(source, cfg.seed, cfg.data.views, cfg.data.img_size, (cfg.data.scale_min, cfg.data.scale_max))
    per_batch = max(1, cfg.data.batch_size // cfg.data.views)
    shards = [range(s, min(s + cfg.cache.images_per_shard, len(source)))
              for s in range(0, len(source), cfg.cache.images_per_shard)]
    loader = view_loader(dataset, shard_batches(shards, per_batch), cfg.data.num_workers, pin_memory=device.type == "cuda")
    views, t0 = 0, time.perf_counter()
    for batch in loader:
        x = batch["views"].flatten(0, 1).to(device, non_blocking=True)
        with torch.inference_mode(), (torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()):
            out = base_forward(base, normalize(x), cfg.targets.last_layers)
        out.features.sum().item()  # wait for the device, as the pipeline's copy to host does
        views += x.shape[0]
    return views / (time.perf_counter() - t0)


# VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child would
# report the (larger) benchmark parent's peak. VmHWM belongs to the new address space.
RSS_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.config import load_config
def hwm_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
after_imports = hwm_mb()
summary = run_cache_targets(load_config(None, {ov!r}))
print(json.dumps({{"peak_rss_mb": hwm_mb(), "rss_after_imports_mb": after_imports,
                   "views_per_s": summary["views"] / summary["loop_seconds"]}}))
"""


def peak_rss(args, n: int, tmp: Path) -> dict:
    """Peak RSS of a whole tiny run over `n` images, in a fresh process (workers 0: one process)."""
    data = write_images(tmp / f"rss{n}", n, (40, 40), seed=n)
    tiny = argparse.Namespace(**{**vars(args), "img_size": 32, "views": 2, "batch": 64, "workers": 0,
                                 "shard": args.rss_shard, "k_max": 3})
    arch = ["base.arch.name=vit_tiny_patch16_224", "base.arch.patch_size=8", "base.arch.embed_dim=32",
            "base.arch.depth=2", "base.arch.num_heads=2"]
    code = RSS_CHILD.format(repo=str(REPO), ov=overrides(tiny, data, tmp / f"rss{n}.zarr", arch))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"images": n, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard", type=int, default=64, help="images per shard")
    p.add_argument("--k-max", type=int, default=15)
    p.add_argument("--feat-dtype", default="float16")
    p.add_argument("--attn-dtype", default="float16")
    p.add_argument("--rss-images", default="1000,5000", help="two image counts for the peak-RSS check ('' to skip)")
    p.add_argument("--rss-shard", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available (fp16 autocast there, as cache-targets); cpu hides the GPUs")
    p.add_argument("--out", type=Path, default=Path("cache_targets_bench.json"))
    args = p.parse_args()
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises, so accelerate picks the CPU too
    elif args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what run_cache_targets (accelerate) picks
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
                    **device_record(device)}
    with tempfile.TemporaryDirectory(prefix="tec-bench-") as tmp:
        tmp = Path(tmp)
        data = write_images(tmp / "images", args.images, (320, 256))
        cfg = load_config(None, overrides(args, data, tmp / "cache.zarr", [f"base.arch.name={args.arch}"]))
        # Bare loop before and after: on a shared machine the load drifts; take their mean.
        bare_before = bare_loop(cfg)
        summary = run_cache_targets(cfg)
        bare_after = bare_loop(cfg)
        bare = (bare_before + bare_after) / 2
        full = summary["views"] / summary["loop_seconds"]
        result["throughput"] = {"bare_views_per_s": bare, "bare_before_after": [bare_before, bare_after],
                                "cache_views_per_s": full, "efficiency": full / bare,
                                "cache_views_per_s_with_setup": summary["views"] / summary["wall_seconds"],
                                "bytes_per_view": summary["bytes_per_view"],
                                "write_mb_per_s": summary["bytes"] / 1e6 / max(summary["write_seconds"], 1e-9)}
        counts = [int(n) for n in args.rss_images.split(",") if n]
        result["rss"] = [peak_rss(args, n, tmp) for n in counts]
    result["max_memory_allocated_gb"] = device_record(device)["max_memory_allocated_gb"]
    print_table(result)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def print_table(result: dict) -> None:
    t, a = result["throughput"], result["args"]
    print(f"\ncache-targets benchmark: {a['arch']} @ {a['img_size']}px, batch {a['batch']}, {a['images']} images x "
          f"{a['views']} views, {a['workers']} workers, {result['device']}")
    print(f"{'loop':<34}{'views/s':>10}")
    print(f"{'bare DataLoader + base forward':<34}{t['bare_views_per_s']:>10.2f}  "
          f"(before {t['bare_before_after'][0]:.2f}, after {t['bare_before_after'][1]:.2f})")
    print(f"{'cache-targets (excl. setup)':<34}{t['cache_views_per_s']:>10.2f}")
    print(f"{'cache-targets (incl. setup)':<34}{t['cache_views_per_s_with_setup']:>10.2f}")
    print(f"efficiency {t['efficiency']:.3f}; {t['bytes_per_view'] / 1e3:.1f} KB/view; "
          f"writer {t['write_mb_per_s']:.1f} MB/s while writing")
    if result["rss"]:
        print(f"\n{'peak RSS, tiny run':<20}{'images':>8}{'peak MB':>10}{'imports MB':>12}{'views/s':>10}")
        for r in result["rss"]:
            print(f"{'':<20}{r['images']:>8}{r['peak_rss_mb']:>10.1f}{r['rss_after_imports_mb']:>12.1f}"
                  f"{r['views_per_s']:>10.1f}")


if __name__ == "__main__":
    main()
