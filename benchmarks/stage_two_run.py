"""Stage two as it trains: `run_train` itself (its loader, workers living across epochs, the compiled
or eager step) from a V-view cache, and online with the base in the step.

Per variant (cache / online x eager / compiled) it reports, over the log records after the first
two (start-up and compilation): images/s, the fraction of time spent waiting for the loader, MFU
(model FLOPs of one step counted by `torch.utils.flop_counter.FlopCounterMode`, times steps/s,
over the card's dense bf16 peak from `benchmarks/cards.py`; null on a card not in its table, or
when not in bf16), and on CUDA the device syncs per step.

Syncs are counted with `torch.cuda.set_sync_debug_mode("warn")` switched on inside the loop
(`loop.train_tec`: batches, views, targets, forward, backward, optimizer step) and off everywhere
else; per step over the steps after the skipped records, and apart from them what the first steps
(compilation) and the log records and checkpoints, the final one included (`loop.end_step`,
`loop.save`, where the loop reads the device by design), cost.

The cache holds synthetic targets of the real shapes (Gaussian features, int8/uint8 storage) with
real crops of synthetic ~500x375 JPEGs, recorded as rendered by ``--loader`` (so stage two renders
with it), so the loader decodes and renders what ImageNet would give it. Prints a table; `--out`
writes the JSON after each variant, so a run cut short keeps the variants it finished.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tec_pipeline.train.loop as loop  # noqa: E402
from cards import device_record  # noqa: E402
from tec_pipeline.stages.train import run_train  # noqa: E402
from tec_pipeline.base_targets import compute_targets  # noqa: E402
from tec_pipeline.config import Config, TargetConfig, TrainConfig, ViTArch  # noqa: E402
from tec_pipeline.models.base import load_base_model  # noqa: E402
from tec_pipeline.models.tec import TECModel  # noqa: E402
from tec_pipeline.step import tec_losses  # noqa: E402
from tec_pipeline.render import resolve_loader  # noqa: E402
from train_step import make_cache, make_images, pick_device  # noqa: E402

SKIPPED_RECORDS = 2  # start-up and compilation fall in the first records


def step_flops(args, online: bool) -> float:
    """FLOPs of one training step (forward + backward of the new model, plus the base's forward
    when online) at the benchmark's batch, counted on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    base = load_base_model(ViTArch(name=args.base_arch, depth=args.depth), None, img_size=args.img_size).to(device)
    C, H = base.embed_dim, base.blocks[-1].attn.num_heads
    arch = ViTArch(name=args.arch, img_size=args.img_size, depth=args.depth)
    model = TECModel(arch, feat_dim=C, attn_dim=C, attn_heads=H).to(device)
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


@dataclass
class StepSyncs:
    """Device syncs counted inside the loop's steps: `per_step[i]` of optimizer step i + 1, and
    `at_records` of the log records and checkpoints between steps. On the CPU the steps are
    counted and every count is None."""

    per_step: list = field(default_factory=list)
    at_records: Optional[int] = None


def sync_warnings(seen: list) -> int:
    return sum("synchroniz" in str(w.message) for w in seen)


@contextmanager
def syncs_in_steps(on: bool):
    """The driver's loop (`loop.train_tec`) wrapped for the block: with `on`, CUDA's sync debug mode
    warns while it runs, and each warning is booked to the optimizer step it falls in, or, inside
    `loop.end_step`, `loop.watch` and `loop.save` (the records, evaluations and checkpoints, where
    the loop reads the device by design), to the records. Set-up and whatever runs outside the
    loop stay uncounted; on the CPU the steps are counted and every count is None."""
    counts, seen, opened = StepSyncs(at_records=0 if on else None), [[]], [0]  # opened: syncs when the step began
    driver = sys.modules[run_train.__module__]
    real = {"train_tec": driver.train_tec, "end_step": loop.end_step, "watch": loop.watch, "save": loop.save}

    def looped(*args, **kwargs):
        if not on:
            return real["train_tec"](*args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen[0], opened[0] = caught, 0
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real["train_tec"](*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    def at_records(name: str):
        def wrapper(*args, **kwargs):
            if name == "end_step":  # an optimizer step's own work is over: its count is closed
                counts.per_step.append(sync_warnings(seen[0]) - opened[0] if on else None)
            before = sync_warnings(seen[0])
            try:
                return real[name](*args, **kwargs)
            finally:
                if on:
                    counts.at_records += sync_warnings(seen[0]) - before
                opened[0] = sync_warnings(seen[0])
        return wrapper

    driver.train_tec = looped
    loop.end_step, loop.watch, loop.save = at_records("end_step"), at_records("watch"), at_records("save")
    try:
        yield counts
    finally:
        driver.train_tec = real["train_tec"]
        loop.end_step, loop.watch, loop.save = real["end_step"], real["watch"], real["save"]


def train_variant(args, url: str, images: Path, out: Path, source: str, compiled: bool) -> dict:
    """One `run_train` of the variant; the rates of its log records after the first ones, and its
    syncs per step over the same steps."""
    steps = args.steps if source == "cache" else args.online_steps
    cfg = Config(seed=0, output=str(out))
    cfg.model = replace(cfg.model, arch=ViTArch(name=args.arch, depth=args.depth))
    cfg.base = replace(cfg.base, arch=ViTArch(name=args.base_arch, depth=args.depth))
    cfg.targets = replace(cfg.targets, source=source, k=args.k)
    cfg.data = replace(cfg.data, path=str(images), img_size=args.img_size, batch_size=args.batch,
                       num_workers=args.workers, views=args.views, loader=args.loader)
    cfg.cache = replace(cfg.cache, path=url)
    cfg.optim = replace(cfg.optim, mixed_precision="bf16" if args.precision == "bf16" else "no")
    cfg.train = TrainConfig(max_steps=steps, log_every=args.log_every, checkpoint_every=10**9, compile=compiled)
    start = time.perf_counter()
    with syncs_in_steps(args.device == "cuda") as syncs:
        run_train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    measured = records[SKIPPED_RECORDS:] or records[-1:]
    first = records[SKIPPED_RECORDS - 1]["step"] if len(records) > SKIPPED_RECORDS else 0  # the skipped steps
    counted = syncs.per_step[first:]
    on = args.device == "cuda"
    return {"source": source, "compiled": compiled, "steps": steps, "wall_s": time.perf_counter() - start,
            "images_per_s": statistics.mean(r["images_per_s"] for r in measured),
            "data_wait": statistics.mean(r["data_wait"] for r in measured),
            "records_measured": len(measured), "steps_counted": len(syncs.per_step), "steps_measured": len(counted),
            "syncs_per_step": statistics.mean(counted) if on else None,
            "syncs_max_step": max(counted) if on else None,
            "syncs_first_steps": sum(syncs.per_step[:first]) if on else None,
            "syncs_at_records": syncs.at_records}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="new model (timm name)")
    p.add_argument("--base-arch", default="vit_base_patch16_224", help="base model (timm name)")
    p.add_argument("--depth", type=int, default=None,
                   help="blocks of both models (default: the archs'); fewer make a smoke run's compile short")
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
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on CUDA, fp32 on the CPU (bf16 autocast runs on the CPU too)")
    p.add_argument("--loader", default="auto", choices=("auto", "pil", "dali"),
                   help="data.loader; the cache records it as its renderer (auto: dali on CUDA, else pil)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.device = pick_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.loader == "auto":
        args.loader = resolve_loader("auto", torch.device(args.device))
    args.feat_dtype, args.attn_dtype = "int8", "uint8"  # what make_cache stores
    res = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           **device_record(args.device), "flops_per_step": {}, "variants": []}
    peak = res["peak_bf16_flops"] if args.precision == "bf16" else None  # MFU against the bf16 peak only
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        source = make_images(tmp / "images", args.images)
        base = load_base_model(ViTArch(name=args.base_arch, depth=args.depth), None, img_size=args.img_size)
        L, C, H = base.patch_embed.num_patches, base.embed_dim, base.blocks[-1].attn.num_heads
        make_cache(str(tmp / "cache.zarr"), source, args, L, C, H, loader=args.loader)
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
            res.update(max_memory_allocated_gb=device_record(args.device)["max_memory_allocated_gb"])
            print(f"{variant}: {json.dumps(row)}", flush=True)
            if args.out:  # written as it goes: a run cut short still leaves its rows
                args.out.write_text(json.dumps(res, indent=2))
    print_table(res)


def print_table(res: dict) -> None:
    s = res["settings"]
    peak = f"{res['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 peak" if res["peak_bf16_flops"] else "no peak: MFU null"
    print(f"\nstage two on {res['card'] or 'cpu'} ({peak}; torch {res['torch']}, CUDA {res['cuda']}): new {s['arch']}, base {s['base_arch']}, {s['img_size']}px, batch "
          f"{s['batch']}, {s['precision']}, data.loader={s['loader']}, {s['workers']} loader workers, V={s['views']} cache of {s['images']} images; "
          + ", ".join(f"{k} step {v / 1e9:.1f} GFLOP" for k, v in res["flops_per_step"].items()))
    print(f"  {'variant':<18} {'steps':>5} {'images/s':>10} {'data wait':>9} {'MFU':>6} {'syncs/step':>10} {'at records':>10}")
    for r in res["variants"]:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        syncs = f"{r['syncs_per_step']:.2f}" if r["syncs_per_step"] is not None else "-"
        at = r["syncs_at_records"] if r["syncs_at_records"] is not None else "-"
        name = f"{r['source']}-{'compiled' if r['compiled'] else 'eager'}"
        print(f"  {name:<18} {r['steps']:>5} {r['images_per_s']:>10.1f} {r['data_wait']:>9.3f} {mfu:>6} {syncs:>10}"
              f" {at:>10}")


if __name__ == "__main__":
    main()
