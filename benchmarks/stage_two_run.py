"""Stage two as it trains: `run_train` itself (its loader, workers living across epochs, the compiled
or eager step) from a V-view cache, and online with the base in the step.

Per variant (cache / online x eager / compiled) it reports, over the log records after the first
two (start-up and compilation): images/s, the fraction of time spent waiting for the loader, MFU
(model FLOPs of one step counted by `torch.utils.flop_counter.FlopCounterMode`, times steps/s,
over the device's datasheet peak for the precision; none for a device not in `PEAK_FLOPS`), and
on CUDA the device syncs per step (`torch.cuda.set_sync_debug_mode("warn")`, warnings counted).

The cache holds synthetic targets of the real shapes (Gaussian features, int8/uint8 storage) with
real crops of synthetic ~500x375 JPEGs, so the loader decodes and renders what ImageNet would
give it. Prints a table; `--out` writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stages.train import run_train  # noqa: E402
from tec_pipeline.base_targets import compute_targets  # noqa: E402
from tec_pipeline.config import Config, TargetConfig, TrainConfig, ViTArch  # noqa: E402
from tec_pipeline.models.base import load_base_model  # noqa: E402
from tec_pipeline.models.tec import TECModel  # noqa: E402
from tec_pipeline.step import tec_losses  # noqa: E402
from train_step import make_cache, make_images, pick_device  # noqa: E402

# Dense bf16 / fp16 tensor-core peak per device (datasheet, FLOP/s): MFU's denominator.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
SKIPPED_RECORDS = 2  # start-up and compilation fall in the first records


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def step_flops(args, online: bool) -> float:
    """FLOPs of one training step (forward + backward of the new model, plus the base's forward
    when online) at the benchmark's batch, counted on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    base = load_base_model(ViTArch(name=args.base_arch), None, img_size=args.img_size).to(device)
    C, H = base.embed_dim, base.blocks[-1].attn.num_heads
    model = TECModel(ViTArch(name=args.arch, img_size=args.img_size), feat_dim=C, attn_dim=C, attn_heads=H).to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        targets = compute_targets(base, images, 2, args.k)
    counter = FlopCounterMode(display=False)
    with counter:
        if online:
            with torch.no_grad():
                compute_targets(base, images, 2, args.k)
        tec_losses(model, images, targets, TargetConfig(k=args.k))["loss"].backward()
    return float(counter.get_total_flops())


@contextmanager
def counted_syncs(on: bool):
    """Count the device syncs CUDA's sync debug mode warns about (`counts["syncs"]`)."""
    counts = {"syncs": None}
    if not on:
        yield counts
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(0)
    counts["syncs"] = sum("synchroniz" in str(w.message) for w in seen)


def train_variant(args, url: str, images: Path, out: Path, source: str, compiled: bool) -> dict:
    """One `run_train` of the variant; the rates of its log records after the first ones."""
    steps = args.steps if source == "cache" else args.online_steps
    cfg = Config(seed=0, output=str(out))
    cfg.model = replace(cfg.model, arch=ViTArch(name=args.arch))
    cfg.base = replace(cfg.base, arch=ViTArch(name=args.base_arch))
    cfg.targets = replace(cfg.targets, source=source, k=args.k)
    cfg.data = replace(cfg.data, path=str(images), img_size=args.img_size, batch_size=args.batch,
                       num_workers=args.workers, views=args.views)
    cfg.cache = replace(cfg.cache, path=url)
    cfg.optim = replace(cfg.optim, mixed_precision="bf16" if args.precision == "bf16" else "no")
    cfg.train = TrainConfig(max_steps=steps, log_every=args.log_every, checkpoint_every=10**9, compile=compiled)
    start = time.perf_counter()
    with counted_syncs(args.device == "cuda") as syncs:
        run_train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    measured = records[SKIPPED_RECORDS:] or records[-1:]
    return {"source": source, "compiled": compiled, "steps": steps, "wall_s": time.perf_counter() - start,
            "images_per_s": statistics.mean(r["images_per_s"] for r in measured),
            "data_wait": statistics.mean(r["data_wait"] for r in measured),
            "syncs_per_step": None if syncs["syncs"] is None else syncs["syncs"] / steps,
            "records_measured": len(measured)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="new model (timm name)")
    p.add_argument("--base-arch", default="vit_base_patch16_224", help="base model (timm name)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--images-per-shard", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each cache variant")
    p.add_argument("--online-steps", type=int, default=50, help="optimizer steps of each online variant")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=["cache-eager", "cache-compiled", "online-eager", "online-compiled"],
                   choices=["cache-eager", "cache-compiled", "online-eager", "online-compiled"])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.device = pick_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    args.feat_dtype, args.attn_dtype = "int8", "uint8"  # what make_cache stores
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_flops(name) if args.precision == "bf16" else None
    res = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "device": name,
           "peak_flops": peak, "flops_per_step": {}, "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        source = make_images(tmp / "images", args.images)
        base = load_base_model(ViTArch(name=args.base_arch), None, img_size=args.img_size)
        L, C, H = base.patch_embed.num_patches, base.embed_dim, base.blocks[-1].attn.num_heads
        make_cache(str(tmp / "cache.zarr"), source, args, L, C, H)
        res["setup_s"] = time.perf_counter() - start
        print(f"setup: {args.images} JPEGs and a V={args.views} cache in {res['setup_s']:.1f} s", flush=True)
        for variant in args.variants:
            kind, mode = variant.split("-")
            if kind not in res["flops_per_step"]:
                res["flops_per_step"][kind] = step_flops(args, online=kind == "online")
            row = train_variant(args, str(tmp / "cache.zarr"), tmp / "images", tmp / variant, kind, mode == "compiled")
            flops_per_image = res["flops_per_step"][kind] / args.batch
            row["mfu"] = flops_per_image * row["images_per_s"] / peak if peak else None
            res["variants"].append(row)
            print(f"{variant}: {json.dumps(row)}", flush=True)
            if args.out:  # written as it goes: a run cut short still leaves its rows
                args.out.write_text(json.dumps(res, indent=2))
    print_table(res)


def print_table(res: dict) -> None:
    s = res["settings"]
    print(f"\nstage two on {res['device']}: new {s['arch']}, base {s['base_arch']}, {s['img_size']}px, batch "
          f"{s['batch']}, {s['precision']}, {s['workers']} loader workers, V={s['views']} cache of {s['images']} images; "
          + ", ".join(f"{k} step {v / 1e9:.1f} GFLOP" for k, v in res["flops_per_step"].items()))
    print(f"  {'variant':<18} {'steps':>5} {'images/s':>10} {'data wait':>9} {'MFU':>6} {'syncs/step':>10}")
    for r in res["variants"]:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        syncs = f"{r['syncs_per_step']:.2f}" if r["syncs_per_step"] is not None else "-"
        name = f"{r['source']}-{'compiled' if r['compiled'] else 'eager'}"
        print(f"  {name:<18} {r['steps']:>5} {r['images_per_s']:>10.1f} {r['data_wait']:>9.3f} {mfu:>6} {syncs:>10}")


if __name__ == "__main__":
    main()
