"""Compact codecs for the feature target Yf (L x C per view): bytes per view against error (issue 27).

Codecs with per-cache parts are fitted on one set of views and measured on others, as a cache
fits on its first shard and encodes the rest: ``int8`` (today's, the reference); ``group4``
(4-bit, a float16 step per patch and group of g channels); ``pca`` (top-r principal directions
fitted per cache, float16; coefficients at 8 or 4 bits with a float16 step per view and
component); ``pq`` (M sub-vectors x 256 k-means centroids per cache, uint8 codes), also after the
PCA rotation (``pq-pca``, the library's ``cache.feat_dtype=pq``, whose PCA and seeded k-means these
use: float64 covariance, seeded Lloyd iterations, so reruns give identical bytes). Targets: `vitb_sets` (a random-init ViT-B/16, a
stand-in whose spectrum is not a trained model's) and `demo_sets` (the demo base's real features).

    .venv/bin/python benchmarks/feat_codecs.py --out /tmp/run1.json      # one run (a few minutes)
    .venv/bin/python benchmarks/feat_codecs.py --combine /tmp/run{1,2,3}.json --out benchmarks/results/feat_codecs.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd
from PIL import Image
from sklearn.datasets import load_sample_images

import merge_runs  # benchmarks/ is on the path of a script run from it
from tec_pipeline.base_targets import load_base, view_targets
from tec_pipeline.cache.codecs import encode_attn_uint8, feat_steps, quantize_feat
from tec_pipeline.cache.fidelity import feat_rel_rms
from tec_pipeline.cache.pq import kmeans, nearest, principal_directions, subvectors
from tec_pipeline.config import ViTArch
from tec_pipeline.demo.data import build_demo_data
from tec_pipeline.models.base import load_base_model
from tec_pipeline.views import draw_view

ZSTD = Zstd(level=1, checksum=True)  # the cache's chunk codec at its default level, one chunk per view
K, LAST_LAYERS = 15, 2


def _step(absmax: torch.Tensor, levels: int) -> torch.Tensor:
    """A float16 step covering `absmax` with `levels` levels each side (never 0, so 0/0 cannot happen)."""
    return (absmax / levels).clamp_min(1e-4).half()


def _quantize(x: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    return (x / step.float()).round().clamp(-levels, levels).to(torch.int8)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in -7..7 (last axis even) -> uint8, two per byte (low nibble first)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack4(u: torch.Tensor) -> torch.Tensor:
    return (torch.stack([u & 15, u >> 4], dim=-1).flatten(-2).to(torch.int16) - 8).to(torch.int8)


class Codec:
    """A codec of features (B, L, C): `encode` -> per-view arrays (leading axis B), `decode` ->
    float32 (B, L, C); `parts` holds what a cache would store once (basis, codebooks)."""
    family, setting, parts = "", "", {}

    def fit(self, sample: torch.Tensor) -> None:
        """Fit the per-cache parts on sample views (B, L, C); codecs without parts need none."""


class Int8(Codec):
    """Today's cache codec: int8 with a float16 step per (view, channel)."""
    family, setting = "int8", "step per (view, channel)"

    def encode(self, x: torch.Tensor) -> dict:
        step = feat_steps(x)
        return {"feat": quantize_feat(x, step), "feat_step": step}

    def decode(self, enc: dict) -> torch.Tensor:
        return enc["feat"].float() * enc["feat_step"].float()[:, None, :]


class Group4(Codec):
    """4-bit values (-7..7) with a float16 step per (patch, group of `g` channels)."""
    family = "group4"

    def __init__(self, g: int):
        self.g, self.setting = g, f"g={g}"

    def encode(self, x: torch.Tensor) -> dict:
        xg = x.unflatten(-1, (-1, self.g))
        step = _step(xg.abs().amax(-1), 7)
        return {"q4": pack4(_quantize(xg, step[..., None], 7).flatten(-2)), "step": step}

    def decode(self, enc: dict) -> torch.Tensor:
        q = unpack4(enc["q4"]).unflatten(-1, (-1, self.g)).float()
        return (q * enc["step"].float()[..., None]).flatten(-2)


class PCA(Codec):
    """Coefficients on a per-cache basis of the top `r` directions, `bits` 8 or 4, a float16 step
    per (view, component); the basis is stored float16 and used as stored on both sides."""
    family = "pca"

    def __init__(self, r: int, bits: int):
        self.r, self.levels, self.bits = r, 127 if bits == 8 else 7, bits
        self.setting = f"r={r}, {'int8' if bits == 8 else '4-bit'}"

    def fit(self, sample: torch.Tensor) -> None:
        self.parts = {"basis": principal_directions(sample.flatten(0, -2))[:, :self.r].half()}

    def encode(self, x: torch.Tensor) -> dict:
        z = x @ self.parts["basis"].float()
        step = _step(z.abs().amax(-2), self.levels)
        q = _quantize(z, step[..., None, :], self.levels)
        return {"coef": q if self.bits == 8 else pack4(q), "step": step}

    def decode(self, enc: dict) -> torch.Tensor:
        q = enc["coef"] if self.bits == 8 else unpack4(enc["coef"])
        return (q.float() * enc["step"].float()[..., None, :]) @ self.parts["basis"].float().T


class PQ(Codec):
    """`m` sub-vectors x 256 centroids, uint8 codes per (patch, sub-vector). With `rotate`, the
    channels are first turned onto the principal directions, dealt round-robin to the
    sub-vectors (direction j to sub-vector j mod m)."""
    family = "pq"

    def __init__(self, m: int, rotate: bool, iters: int = 12, seed: int = 0):
        self.m, self.rotate, self.iters, self.seed = m, rotate, iters, seed
        self.family, self.setting = ("pq-pca" if rotate else "pq"), f"M={m} x 256"

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (M, rows, d): sub-vector j holds the columns j, j+M, j+2M, ..."""
        if self.rotate:
            x = x @ self.parts["rotation"].float()
        return subvectors(x.reshape(-1, x.shape[-1]), self.m)

    def fit(self, sample: torch.Tensor) -> None:
        self.parts = {"rotation": principal_directions(sample.flatten(0, -2)).half()} if self.rotate else {}
        z = self._split(sample)
        self.parts["codebooks"] = kmeans(z, 256, self.iters, self.seed).half()

    def encode(self, x: torch.Tensor) -> dict:
        codes = nearest(self._split(x), self.parts["codebooks"].float())
        return {"codes": codes.T.reshape(*x.shape[:-1], self.m).to(torch.uint8)}

    def decode(self, enc: dict) -> torch.Tensor:
        z = self.parts["codebooks"].float()[torch.arange(self.m), enc["codes"].long()]  # (..., M, d)
        z = z.transpose(-1, -2).flatten(-2)  # back to column j + M * i
        return z @ self.parts["rotation"].float().T if self.rotate else z


def codecs_for(c: int) -> list:
    """The settings tried at feature width `c`: ViT-B (768) around the 32 KB goal and below it,
    the demo (128) at the same fractions of its width."""
    if c == 768:
        return [Int8(), Group4(32), Group4(128), PCA(160, 8), PCA(128, 8), PCA(96, 8), PCA(64, 8),
                PCA(256, 4), PCA(192, 4), PQ(128, False), PQ(128, True), PQ(96, True)]
    return [Int8(), Group4(32), PCA(c // 4, 8), PCA(c // 8, 8), PCA(c // 3, 4), PCA(c // 4, 4),
            PQ(c // 4, False), PQ(c // 4, True), PQ(c // 8, True)]


# ----------------------------------------------------------------------------- targets


def stage_one_targets(base, images: list, size: int, views: int, seed: int = 0) -> dict:
    """Targets and crop of `views` seeded stage-one views of each image, computed as stage one
    does (`view_targets`, float32 on the CPU), flattened to one leading axis of views."""
    out = []
    for i, image in enumerate(images):
        drawn = [draw_view(image, seed, i, v, size) for v in range(views)]
        out.append(view_targets(base, torch.stack([d[0] for d in drawn])[None], LAST_LAYERS, K, torch.device("cpu"), None))
        out[-1]["crop"] = torch.from_numpy(np.stack([d[1].as_array() for d in drawn]))[None]
    return {name: torch.cat([o[name] for o in out]).flatten(0, 1) for name in out[0]}


def vitb_sets(views: int) -> dict:
    """Targets of a random-init ViT-B/16 (seeded as stage one seeds it) on `views` views of each
    of scikit-learn's two sample photos, split two ways into (fit, held-out): "vitb-photo" fits
    on the first photo and measures on the second (a new image: the pessimistic end, a first
    shard holds many images); "vitb-crops" fits on half the views of each photo and measures on
    the other half (new crops of seen images: the optimistic end)."""
    base = load_base(ViTArch(name="vit_base_patch16_224"), None, 224, seed=0)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    t = stage_one_targets(base, photos, 224, views)
    first, crops = torch.arange(2 * views) < views, torch.arange(2 * views) % views < views // 2
    return {name: ({k: v[m] for k, v in t.items()}, {k: v[~m] for k, v in t.items()})
            for name, m in (("vitb-photo", first), ("vitb-crops", crops))}


def demo_sets(images: int, data: str) -> dict:
    """{"demo": (fit, held-out)}: targets of the demo base on one view of each of 2 x `images` demo
    training images (the first `images` in name order to fit on, the next ones to measure on)."""
    if not Path(data, "train").is_dir():
        data = tempfile.mkdtemp()
        build_demo_data(data, train_size=2 * images, test_size=16)
    paths = sorted(Path(data, "train").glob("*/*.png"), key=lambda p: p.name)[:2 * images]
    pictures = [Image.open(p).convert("RGB") for p in paths]
    base = load_base_model(None, "assets/demo_base/encoder.safetensors")
    size = base.patch_embed.img_size[0]
    return {"demo": (stage_one_targets(base, pictures[:images], size, 1),
                     stage_one_targets(base, pictures[images:], size, 1))}


# ----------------------------------------------------------------------------- measures


def view_bytes(enc: dict) -> tuple[float, float]:
    """(raw, zstd) bytes per view of encoded arrays with one leading axis of views: raw from the
    arrays' own nbytes, zstd as the cache stores them (each array one chunk per view)."""
    arrays = [t.numpy() for t in enc.values()]
    n = len(arrays[0])
    packed = sum(len(ZSTD.encode(np.ascontiguousarray(a[i]))) for a in arrays for i in range(n))
    return sum(a.nbytes for a in arrays) / n, packed / n


def other_arrays(t: dict) -> dict:
    """A view's arrays besides the features, as today's int8 / uint8 cache stores them."""
    return {"attn": encode_attn_uint8(t["attn"]), "feat_mean": t["feat_mean"].half(),
            "feat_std": t["feat_std"].half(), "topk_idx": t["topk_idx"].to(torch.int16), "crop": t["crop"]}


def errors(ref: torch.Tensor, approx: torch.Tensor) -> dict:
    """Relative RMS over all values (`fidelity.feat_rel_rms`) and the mean cosine per patch."""
    cos = torch.nn.functional.cosine_similarity(approx.double(), ref.double(), dim=-1)
    return {"rel_rms": feat_rel_rms(ref, approx), "cosine": float(cos.mean())}


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(codec, fit: dict, held: dict, repeats: int) -> dict:
    """Fit `codec` on the fit views, then bytes, error and speed on the held-out views (and the
    error on the fit views themselves, the optimistic end)."""
    fit_s = seconds(lambda: codec.fit(fit["feat"]))
    x = held["feat"]
    enc = codec.encode(x)
    raw, packed = view_bytes(enc)
    per_view = {name: 1e6 / len(x) * statistics.median(seconds(fn) for _ in range(repeats))  # median of the calls
                for name, fn in (("encode_us", lambda: codec.encode(x)), ("decode_us", lambda: codec.decode(enc)))}
    return {"family": codec.family, "setting": codec.setting, "feat_bytes": raw, "feat_bytes_zstd": packed,
            "parts_bytes": sum(p.numpy().nbytes for p in codec.parts.values()), **errors(x, codec.decode(enc)),
            "rel_rms_fit_views": errors(fit["feat"], codec.decode(codec.encode(fit["feat"])))["rel_rms"],
            "fit_s": fit_s, **per_view}


def run(name: str, fit: dict, held: dict, repeats: int) -> tuple[dict, list]:
    """Every codec of this width on one set of targets: (shape and other bytes, rows)."""
    other_raw, other_zstd = view_bytes(other_arrays(held))
    L, C = held["feat"].shape[1:]
    info = {"L": L, "C": C, "fit_views": len(fit["feat"]), "held_out_views": len(held["feat"]),
            "other_bytes": other_raw, "other_bytes_zstd": other_zstd}
    rows = []
    for codec in codecs_for(C):
        row = measure(codec, fit, held, repeats)
        row.update(targets=name, view_bytes_zstd=row["feat_bytes_zstd"] + other_zstd)
        rows.append(row)
        print_row(row, header=len(rows) == 1)
    return info, rows


def worst_attention_bytes(L: int = 196, H: int = 12, views: int = 64) -> dict:
    """uint8 attention bytes per view of Gaussian logits of std 2.5 (`cache_bytes.py`'s worst
    case): what a trained base's peaked attention may cost, against the stand-in's flat one."""
    g = torch.Generator().manual_seed(0)
    raw, packed = view_bytes({"attn": encode_attn_uint8(2.5 * torch.randn(views, K + 1, H, L, generator=g))})
    return {"raw": raw, "zstd": packed}


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'targets':10} {'codec':7} {'setting':24} {'feat B':>7} {'zstd KB':>7} {'view KB':>7} "
              f"{'rRMS':>6} {'fit rRMS':>8} {'cos':>6} {'enc us':>7} {'dec us':>7}")
    print(f"{row['targets']:10} {row['family']:7} {row['setting']:24} {row['feat_bytes']:7.0f} "
          f"{row['feat_bytes_zstd'] / 1e3:7.1f} {row['view_bytes_zstd'] / 1e3:7.1f} {100 * row['rel_rms']:5.1f}% "
          f"{100 * row['rel_rms_fit_views']:7.1f}% {row['cosine']:6.3f} {row['encode_us']:7.0f} {row['decode_us']:7.0f}",
          flush=True)


TIMINGS = ("encode_us", "decode_us", "fit_s")


def combine(paths: list[str]) -> dict:
    """Runs of this script -> one result (`merge_runs.combine`: bytes and errors must agree)."""
    return merge_runs.combine(paths, TIMINGS, lambda row: f"{row['targets']} {row['family']} {row['setting']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vitb-views", type=int, default=64, help="ViT-B views per photo (two splits, see vitb_sets)")
    ap.add_argument("--demo-images", type=int, default=256, help="demo images to fit on, as many to measure on")
    ap.add_argument("--data", default="data/demo", help="demo data (built into a temporary folder if absent)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per codec; the median is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the codecs (targets use 2)")
    ap.add_argument("--combine", nargs="+", help="JSON files of earlier runs to merge into --out")
    ap.add_argument("--out", default="benchmarks/results/feat_codecs.json")
    args = ap.parse_args()
    if args.combine:
        result = combine(args.combine)
    else:
        result = {"info": {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                           "python": platform.python_version(), "torch": torch.__version__,
                           "codec_threads": args.threads, "repeats": args.repeats, "runs": 1,
                           "worst_attention_bytes_vitb": worst_attention_bytes()}, "rows": []}
        for sets in (lambda: demo_sets(args.demo_images, args.data), lambda: vitb_sets(args.vitb_views)):
            torch.set_num_threads(2)
            targets = sets()
            torch.set_num_threads(args.threads)
            for name, (fit, held) in targets.items():
                with torch.inference_mode():
                    result["info"][name], rows = run(name, fit, held, args.repeats)
                result["rows"] += rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
