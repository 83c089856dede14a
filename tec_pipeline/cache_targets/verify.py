"""Checking a written cache against the base model: which views to recompute, how to recompute
one exactly as stage one did, and how close it must come to what is stored.

A view is rebuilt from the cache's metadata alone: the source image, the seeded crop of
(seed, image, view) (which must equal the stored crop) and the base at the recorded weights.
It is recomputed in the cache's recorded compute precision (``base.compute_dtype``), so its
targets differ from the stored ones only by the storage dtypes' rounding and, for a cache made
under fp16 or bf16 autocast, that precision's noise; the tolerances below bound each.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..base_targets import autocast, dtype_of
from ..cache.fidelity import aggregate_errors, attn_kl_rows, feat_rel_rms
from ..cache.schema import read_markers
from ..cache.store import CacheCorruptError
from ..data.sources import BadImageError, image_size
from ..errors import UserError
from ..models.base import base_forward
from ..render import ViewRenderer, cache_loader, dali_missing, open_renderer
from ..targets import enhance, query_rows, row_logits
from ..views import normalize, sample_view

# Tolerances of a recomputed view against the stored one, by storage dtype. Features: relative
# RMS of Yf; attention: KL of the row softmaxes at tau=1.8. Each bound sits above its storage
# dtype's own rounding error (what stage one records per shard, ``fidelity.error_stats``, and
# ``inspect`` shows), so rounding alone never fails a view. Reduced-precision compute (a cache
# made under fp16 or bf16 autocast, recomputed in it) adds its own noise on top: one view alone
# runs other kernels than a batch; the bounds below are bf16's, the coarser of the two.
FEAT_TOL = {"float32": 1e-3, "float16": 3e-3, "int8": 0.04}
# pq's error is not fixed by its dtype: it is what the fitted parts reach on these features, which
# stage one measures on a sample of every shard. A view's own error spreads around that mean (the
# demo base's 256 held-out views: 12.5-19.8 % at 15.0 % with M = 32, 21.5-32.3 % at 25.3 % with
# M = 16, at most 1.32x the mean), so its bound is the recorded error scaled, plus a margin; a
# damaged code or wrong parts decode to another patch, far beyond it.
PQ_TOL_SCALE, PQ_TOL_MARGIN = 1.5, 0.02
ATTN_KL_TOL = {"float32": 1e-5, "float16": 1e-4, "uint8": 2e-3}
HALF_FEAT_TOL, HALF_KL_TOL, HALF_TOPK_MIN_OVERLAP = 0.05, 1e-2, 0.5
TOPK_MIN_OVERLAP = 0.9


def check_files(reader) -> bool:
    """Every data file recorded for a completed shard exists with its recorded size (as storage has
    it now: object-store clients cache listings); one line per damaged shard."""
    reader.fs.invalidate_cache()
    damaged = reader.damaged_shards()
    for shard, why in sorted(damaged.items()):
        print(f"FAIL shard {shard}: {why}")
    return not damaged


def pick_views(reader, missing: list[int], sample: int, seed: int) -> list[tuple[int, int]]:
    """The views to recompute: `sample` distinct (image, view) pairs of the written shards, drawn by `seed`."""
    images = [i for s in range(reader.num_shards) if s not in missing for i in reader.shard_range(s)]
    total = len(images) * reader.views
    picks = np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False)
    return [(images[p // reader.views], int(p % reader.views)) for p in sorted(picks)]


def cache_renderer(meta: dict, device: torch.device) -> ViewRenderer:
    """The renderer that made the cache (``data.loader`` in its identity; pil before it was recorded)."""
    loader = cache_loader(meta)
    if loader == "dali" and dali_missing():
        raise UserError(f"the cache was rendered with data.loader=dali: {dali_missing()}")
    return open_renderer(loader, meta["img_size"], device, 1)


def verify_view(reader, source, base, renderer: ViewRenderer, image: int, view: int) -> bool:
    """Recompute one view and compare; prints one line."""
    meta, device = reader.meta, renderer.device
    where = f"image {image} view {view} ({source.name(image)})"
    try:
        stored = reader.read_view(image, view)
    except CacheCorruptError as err:
        print(f"FAIL {where}: {err}")
        return False
    if not stored["valid"]:
        print(f"skip {where}: marked skipped (undecodable when the cache was written)")
        return True
    try:
        raw = source.raw(image)
        params = sample_view(meta["seed"], image, view, *image_size(raw, source.name(image)), tuple(meta["scale"]))
    except BadImageError as err:
        print(f"FAIL {where}: {err}")
        return False
    pixels, errors = renderer.render([np.frombuffer(raw, np.uint8)], params.as_array()[None])
    if errors[0]:
        print(f"FAIL {where}: {errors[0]}")
        return False
    if not np.array_equal(stored["crop"], params.as_array()):
        print(f"FAIL {where}: stored crop {stored['crop'].tolist()} != drawn crop {params.as_array().tolist()}")
        return False
    ref = reference_view(base, pixels, meta, stored["topk_idx"], device)  # the drawn crop is the stored one
    return compare_view(where, stored, ref, meta, feat_tolerance(reader))


def reference_view(base, pixels: torch.Tensor, meta: dict, topk_idx: Optional[np.ndarray], device) -> dict[str, np.ndarray]:
    """The base model's targets for one view (pixels (1, 3, S, S) uint8); attention rows taken at
    the given (e.g. *stored*) top-k so rows are compared like for like even where near-ties rank
    differently, or at the view's own top-k when `topk_idx` is None."""
    with torch.inference_mode(), autocast(device, dtype_of(meta.get("compute_dtype"))):
        out = base_forward(base, normalize(pixels.to(device)), meta["last_layers"])
    t = enhance(out.features, out.queries, out.keys, int(meta["k_max"]))
    topk = t.topk_idx if topk_idx is None else torch.as_tensor(topk_idx, dtype=torch.long, device=device)[None]
    rows = query_rows(topk)
    attn = row_logits(out.queries, out.keys, rows)[0][:, :, 1:].permute(1, 0, 2)  # (k+1, H, L): stored layout
    ref = {name: getattr(t, name)[0].cpu().numpy() for name in ("feat", "feat_mean", "feat_std", "topk_idx")}
    return {**ref, "attn": attn.cpu().numpy()}


def raw_features(t: dict[str, np.ndarray]) -> np.ndarray:
    """Y before Eq. 2, (L, C) from the stored Yf and its per-channel mean and std."""
    return t["feat"] * t["feat_std"] + t["feat_mean"]


def recorded_feat_error(reader) -> float:
    """The feature relative RMS stage one measured on the cache's sampled views: the summary's
    once complete, else its written shards' (their completion markers)."""
    quant = reader.summary.get("quantization") or aggregate_errors(
        [m["stats"] for m in read_markers(reader.fs, reader.root).values()])
    return float(quant["feat_rel_rms"])


def feat_tolerance(reader) -> float:
    """The bound of a view's feature relative RMS for the cache's storage dtype (``FEAT_TOL``);
    pq: ``1.5 x`` its recorded error ``+ 0.02``."""
    if reader.meta["feat_dtype"] == "pq":
        return PQ_TOL_SCALE * recorded_feat_error(reader) + PQ_TOL_MARGIN
    return FEAT_TOL[reader.meta["feat_dtype"]]


def compare_view(where: str, stored: dict, ref: dict, meta: dict, feat_tol: float) -> bool:
    """Relative RMS of features (bound `feat_tol`, `feat_tolerance`), KL of attention rows, top-k
    overlap, each against its tolerance."""
    half = dtype_of(meta.get("compute_dtype")) is not None
    feat_tol = max(feat_tol, HALF_FEAT_TOL if half else 0)
    kl_tol = max(ATTN_KL_TOL[meta["attn_dtype"]], HALF_KL_TOL if half else 0)
    feat_err = max(feat_rel_rms(ref["feat"], stored["feat"]), feat_rel_rms(raw_features(ref), raw_features(stored)))
    kl = float(attn_kl_rows(ref["attn"], stored["attn"]).mean()) if ref["attn"].size else 0.0
    k = len(ref["topk_idx"])
    overlap = len(set(ref["topk_idx"].tolist()) & set(stored["topk_idx"].tolist())) / k if k else 1.0
    min_overlap = HALF_TOPK_MIN_OVERLAP if half else TOPK_MIN_OVERLAP
    good = feat_err <= feat_tol and kl <= kl_tol and overlap >= min_overlap
    print(f"{'ok  ' if good else 'FAIL'} {where}: feat rel-rms {feat_err:.1e} (tol {feat_tol:.0e}), "
          f"attn KL {kl:.1e} (tol {kl_tol:.0e}), top-k overlap {overlap:.2f} (min {min_overlap})")
    return good
