"""Bytes per view, quantization error and read speed of the cache storage settings.

ViT-B/16 at 224 (L=196, C=768, H=12, k=15) and the demo base. Three kinds of targets:

- ``vit``: a randomly initialized timm ViT-B/16 (the pipeline's own base forward and target
  enhancement) on crops of scikit-learn's sample photographs; its attention logits are
  nearly uniform, so this is the easy case for the attention codec. A stand-in: its features'
  spectrum is not a trained model's (docs/benchmarks.md says how that may bias pq's error);
- ``gauss``: patch-normalized Gaussian features with 1 % outlier channels (x20) and Gaussian
  logits of std 2.5: the worst case for the codecs (no low-rank structure for pq to find);
- ``demo``: the demo base's real targets (``assets/demo_base``, L=64, C=128, H=4, k=15) on one
  stage-one view of each of 256 demo training images (``feat_codecs.demo_sets``).

For each (store, feat dtype, attn dtype[, pq sub-vectors]) it writes a cache, then reports bytes
per view (data files only; the feature arrays alone for zarr, whose arrays are files of their
own), write and read speed (``read_shard`` over all shards, ``read_view`` over all views in
random order with a fresh reader, so shard indexes load on first use) pinned to one CPU core,
and the measured error of the lossy settings (feature relative RMS and mean cosine, attention
mean KL at tau = 1.8). pq parts are fitted on other views than the stored ones, as a cache fits
on a sample and encodes everything: ``vit`` on other crops of the same photos (the optimistic
end), ``gauss`` on other draws, ``demo`` on 256 other images. Files are read right after being
written, so reads come from the page cache.

    .venv/bin/python benchmarks/cache_bytes.py [--targets gauss vit demo] [--out benchmarks/results/cache_bytes.json]
    .venv/bin/python benchmarks/cache_bytes.py --combine /tmp/cb{1,2,3}.json --out benchmarks/results/cache_bytes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import merge_runs  # benchmarks/ is on the path of a script run from it
from tec_pipeline.cache import create_cache, open_cache
from tec_pipeline.cache.pq import fit_pq

L, C, H, K = 196, 768, 12, 15
SETTINGS = [  # (store, feat dtype, attn dtype, pq sub-vectors)
    ("zarr", "float32", "float32", None),
    ("zarr", "float16", "float16", None),
    ("zarr", "int8", "float16", None),
    ("zarr", "float16", "uint8", None),
    ("zarr", "int8", "uint8", None),
    ("webdataset", "float16", "float16", None),
    ("webdataset", "int8", "uint8", None),
    ("zarr", "pq", "uint8", 128),  # 6 channels per code: 25 KB of features per ViT-B view
    ("zarr", "pq", "uint8", 96),  # 8 channels per code
    ("webdataset", "pq", "uint8", 128),
]
TIMINGS = ("write_views_per_s", "write_MB_per_s", "read_shard_views_per_s", "read_view_views_per_s", "fit_s")
DEMO_SETTINGS = [("zarr", "int8", "uint8", None), ("zarr", "pq", "uint8", 32), ("zarr", "pq", "uint8", 16),
                 ("webdataset", "pq", "uint8", 32)]  # M = 32: a quarter of int8's 8,448 B; 16: an eighth


def gauss_targets(n: int, views: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Worst-case-like targets: Gaussian, patch-normalized, 1 % of channels 20x larger."""
    r = np.random.default_rng(seed)
    y = r.standard_normal((n, views, L, C), dtype=np.float32)
    y[..., r.choice(C, C // 100, replace=False)] *= 20
    mean, std = y.mean(axis=2), y.std(axis=2, ddof=1) + 1e-6
    return {"feat": (y - mean[:, :, None]) / std[:, :, None], "feat_mean": mean, "feat_std": std,
            "attn": 2.5 * r.standard_normal((n, views, K + 1, H, L), dtype=np.float32),
            "topk_idx": np.argsort(-r.random((n, views, L)), axis=-1)[..., :K]}


def vit_targets(n: int, views: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Targets of a random-init ViT-B/16 on random 224 crops (and flips) of the sample photos."""
    import torch
    from sklearn.datasets import load_sample_images

    from tec_pipeline.models.base import load_base_model
    from tec_pipeline.base_targets import compute_targets

    torch.manual_seed(seed)
    r = np.random.default_rng(seed)
    photos = load_sample_images().images
    crops = []
    for _ in range(n * views):
        p = photos[r.integers(len(photos))]
        t, le = r.integers(0, p.shape[0] - 224), r.integers(0, p.shape[1] - 224)
        c = p[t:t + 224, le:le + 224]
        crops.append(c[:, ::-1] if r.random() < 0.5 else c)
    x = torch.tensor(np.stack(crops), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    base = load_base_model("vit_base_patch16_224", None)
    outs = [compute_targets(base, x[i:i + 16], last_layers=2, k=K) for i in range(0, len(x), 16)]
    cat = {f: torch.cat([getattr(o, f) for o in outs]).numpy() for f in ("feat", "feat_mean", "feat_std", "attn", "topk_idx")}
    return {k: v.reshape((n, views) + v.shape[1:]) for k, v in cat.items()}


def demo_targets(images: int, data: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(targets of the demo base on one view of each of `images` demo images, (n, 1, ...), and the
    features of one view of each of `images` other ones, (n, L, C), to fit pq's parts on)."""
    from feat_codecs import demo_sets  # benchmarks/ is on the path of a script run from it

    fit, held = demo_sets(images, data)["demo"]
    return {k: v.numpy()[:, None] for k, v in held.items() if k != "crop"}, fit["feat"].numpy()


def full_targets(kind: str, images: int, views: int, unique: int, data: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(``unique`` images of targets tiled to ``images`` (zstd works per chunk, so sizes are
    unbiased), features of other views to fit pq's parts on); the demo's targets are 256 images
    of its own, one view each, not tiled."""
    if kind == "demo":
        base, fit = demo_targets(256, data)
    else:
        both = (vit_targets if kind == "vit" else gauss_targets)(2 * unique, views)  # one base, one draw of outliers
        base, fit = {k: v[:unique] for k, v in both.items()}, both["feat"][unique:]
        base = {k: np.concatenate([v] * -(-images // unique))[:images] for k, v in base.items()}
    images, views = base["feat"].shape[:2]
    r = np.random.default_rng(1)
    base["crop"] = r.integers(0, 500, (images, views, 5)).astype(np.int32)
    base["valid"] = np.ones(images, np.uint8)
    base["label"] = r.integers(0, 1000, images)
    return base, fit.reshape(-1, *fit.shape[-2:])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_setting(root: Path, data: dict, store: str, feat_dtype: str, attn_dtype: str, m: int | None,
                fit: np.ndarray, per_shard: int, repeats: int) -> dict:
    (n, views, patches, width), (heads, k) = data["feat"].shape, data["attn"].shape[3:4] + data["topk_idx"].shape[2:]
    meta = dict(store=store, num_images=n, views=views, num_patches=patches, feat_dim=width, heads=heads, k_max=k,
                images_per_shard=per_shard, feat_dtype=feat_dtype, attn_dtype=attn_dtype, zstd_level=1,
                identity={"bench": True}, pq_subvectors=m)
    url = str(root / f"{store}-{feat_dtype}{m or ''}-{attn_dtype}")
    writer = create_cache(url, meta, overwrite=True)
    fit_s = timed(lambda: writer.record_feat_codec(fit_pq(torch.from_numpy(fit), m))) if m else 0.0
    t = time.perf_counter()
    stats = [writer.write_shard(s, {k: v[writer.shard_range(s).start:writer.shard_range(s).stop]
                                    for k, v in data.items()}) for s in range(writer.num_shards)]
    write_s = time.perf_counter() - t
    writer.finalize({})
    doc = open_cache(url).doc
    quant, data_bytes = doc["summary"]["quantization"], sum(s["bytes"] for s in stats)
    feat_bytes = (sum(size for shard in doc["shards"].values() for rel, size in shard["files"].items()
                      if rel.split("/")[0] in ("feat", "feat_step")) if store == "zarr" else None)
    parts = writer.feat_codec.arrays() if m else {}

    # Reads: best of `repeats` passes (other work on a shared host disturbs some passes; the best
    # pass is the least disturbed one). The first pass also warms the allocator.
    reader = open_cache(url)

    def all_shards() -> None:
        for s in range(reader.num_shards):
            reader.read_shard(s)

    shard_s = min(timed(all_shards) for _ in range(repeats))
    order = np.random.default_rng(0).permutation(n * views)

    def random_views() -> None:
        fresh = open_cache(url)  # shard / tar indexes are loaded on first use
        for j in order:
            fresh.read_view(int(j) // views, int(j) % views)

    view_s = min(timed(random_views) for _ in range(repeats))
    return {"store": store, "feat_dtype": feat_dtype, "attn_dtype": attn_dtype, "pq_subvectors": m,
            "bytes_per_view": data_bytes / (n * views),
            "feat_bytes_per_view": None if feat_bytes is None else feat_bytes / (n * views),
            "parts_bytes": int(sum(a.nbytes for a in parts.values())), "fit_s": fit_s, "fit_views": len(fit) if m else 0,
            "feat_rel_rms": quant["feat_rel_rms"], "feat_cosine": quant["feat_cosine"],
            "attn_kl": quant["attn_kl"], "write_views_per_s": n * views / write_s,
            "write_MB_per_s": data_bytes / write_s / 1e6,
            "read_shard_views_per_s": n * views / shard_s, "read_view_views_per_s": n * views / view_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["gauss", "vit", "demo"], choices=["gauss", "vit", "demo"])
    ap.add_argument("--data", default="data/demo", help="demo data (built into a temporary folder if absent)")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--unique", type=int, default=16, help="distinct images of targets (then tiled)")
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="read passes; the best is reported")
    ap.add_argument("--dir", default=None, help="where to write the caches (default: a temporary directory)")
    ap.add_argument("--combine", nargs="+", help="JSON files of earlier runs to merge into --out (medians of speeds)")
    ap.add_argument("--out", default="benchmarks/results/cache_bytes.json")
    args = ap.parse_args()
    if args.combine:
        name = lambda r: f"{r['targets']} {r['store']} {r['feat_dtype']}{r['pq_subvectors'] or ''}"  # noqa: E731
        result = merge_runs.combine(args.combine, TIMINGS, name)
        result["info"]["load_1min_runs"] = [json.loads(Path(p).read_text())["info"]["load_1min"] for p in args.combine]
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return

    rows = []
    for kind in args.targets:
        data, fit = full_targets(kind, args.images, args.views, args.unique, args.data)
        core = sorted(os.sched_getaffinity(0))[0]
        all_cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})  # measure on one core (the target forward above used all)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's threads would otherwise take turns on that one core
        try:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                for store, fd, ad, m in DEMO_SETTINGS if kind == "demo" else SETTINGS:
                    row = {"targets": kind, **run_setting(Path(tmp), data, store, fd, ad, m, fit,
                                                          args.images_per_shard, args.repeats)}
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)
        finally:
            os.sched_setaffinity(0, all_cores)
            torch.set_num_threads(threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "sizes": {"L": L, "C": C, "H": H, "k": K, "images": args.images, "views": args.views,
                      "unique_images": args.unique, "images_per_shard": args.images_per_shard,
                      "demo": "L=64, C=128, H=4, k=15: 256 images x 1 view, pq fitted on 256 other images"},
            "load_1min": os.getloadavg()[0],
            "note": "reads right after writes (page cache), best of --repeats passes; one core; "
                    "bytes = data files only; write includes encoding, error measurement and fsync"}
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'targets':7} {'store':10} {'feat':7} {'attn':7} {'KB/view':>8} {'feat KB':>8} {'feat rRMS':>9} "
              f"{'cosine':>6} {'attn KL':>8} {'write v/s':>9} {'MB/s':>6} {'shard v/s':>9} {'view v/s':>8}")
    feat = row["feat_dtype"] + (str(row["pq_subvectors"]) if row["pq_subvectors"] else "")
    feat_kb = "-" if row["feat_bytes_per_view"] is None else f"{row['feat_bytes_per_view'] / 1000:.2f}"
    print(f"{row['targets']:7} {row['store']:10} {feat:7} {row['attn_dtype']:7} "
          f"{row['bytes_per_view'] / 1000:8.2f} {feat_kb:>8} {100 * row['feat_rel_rms']:8.2f}% "
          f"{row['feat_cosine']:6.3f} {row['attn_kl']:8.1e} "
          f"{row['write_views_per_s']:9.0f} {row['write_MB_per_s']:6.0f} {row['read_shard_views_per_s']:9.0f} "
          f"{row['read_view_views_per_s']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
