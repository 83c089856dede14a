"""How far a view's targets move when another renderer draws it, and whether stage two may then
render with it.

Two renderers (`tec_pipeline.render`) resample the same crop with slightly different filters, so
the base sees slightly different pixels and gives slightly different targets. Stage one measures
that drift on a sample of views once the cache is complete (`measure_drift`, recorded in the
cache's summary as ``renderer_drift``). Stage two may train with a renderer other than the
cache's only where the recorded drift is below the error int8 storage already puts in every
target (`check_renderer`): the model then sees no larger a change than a lossy cache makes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..cache.codecs import ATTN_STEP, FEAT_MIN_STEP
from ..cache.fidelity import KL_TAU, attn_kl_rows
from ..data.sources import BadImageError, ImageSource, image_size
from ..errors import UserError
from ..render import LOADERS, ViewRenderer, cache_loader, dali_missing, open_renderer
from ..views import sample_view
from .verify import reference_view

# int8 storage's own error: a uniform rounding error of one step s on a unit-variance feature,
# s / sqrt(12) relative RMS; on the attention logits, of step 0.1, KL ~ Var(d) / (2 tau^2).
INT8_FEAT_REL_RMS = FEAT_MIN_STEP / math.sqrt(12)
UINT8_ATTN_KL = ATTN_STEP ** 2 / 12 / (2 * KL_TAU ** 2)
DRIFT_VIEWS = 16


def drift_sample(source: ImageSource, meta: dict, views: int) -> tuple[list[bytes], np.ndarray]:
    """The first `views` decodable images' files and the crops of their view 0, as the cache drew them."""
    files, crops = [], []
    for index in range(len(source)):
        if len(files) == views:
            break
        try:
            raw = source.raw(index)
            height, width = image_size(raw, source.name(index))
        except (BadImageError, OSError):
            continue
        files.append(raw)
        crops.append(sample_view(meta["seed"], index, 0, height, width, tuple(meta["scale"])).as_array())
    return files, np.stack(crops) if crops else np.zeros((0, 5), np.int32)


def measure_drift(base, device: torch.device, source: ImageSource, meta: dict, other: str,
                  views: int = DRIFT_VIEWS) -> dict:
    """`targets_drift` between the cache's renderer and `other` on the first `views` images' view 0."""
    files, crops = drift_sample(source, meta, views)
    made = cache_loader(meta)
    first, second = (open_renderer(name, meta["img_size"], device, max(1, len(files))) for name in (made, other))
    return targets_drift(base, meta, [np.frombuffer(f, np.uint8) for f in files], crops, first, second)


def targets_drift(base, meta: dict, encoded: list[np.ndarray], crops: np.ndarray, first: ViewRenderer,
                  second: ViewRenderer) -> dict:
    """Feature relative RMS and attention KL (tau = 1.8) between the targets of the same views drawn
    by two renderers, the base run on the first renderer's device as the cache's recorded
    precision asks. Attention rows are compared at the first rendering's top-k, so a near-tie
    that ranks differently does not count as drift."""
    device = first.device
    (mine, bad_a), (theirs, bad_b) = first.render(encoded, crops), second.render(encoded, crops)
    theirs = theirs.to(device)
    err_sq = ref_sq = 0.0
    kls = []
    for i in range(len(encoded)):
        if bad_a[i] or bad_b[i]:
            continue
        a = reference_view(base, mine[i:i + 1], meta, None, device)  # at its own top-k
        b = reference_view(base, theirs[i:i + 1], meta, a["topk_idx"], device)
        err_sq += float(((a["feat"] - b["feat"]).astype(np.float64) ** 2).sum())
        ref_sq += float((a["feat"].astype(np.float64) ** 2).sum())
        kls.append(float(attn_kl_rows(a["attn"], b["attn"]).mean()) if a["attn"].size else 0.0)
    if not kls:
        return {}
    return {"feat_rel_rms": math.sqrt(err_sq / max(ref_sq, 1e-30)), "attn_kl": float(np.mean(kls)), "views": len(kls)}


def drift_to_others(base, device: torch.device, source: ImageSource, meta: dict) -> dict:
    """`measure_drift` to each renderer other than the cache's that can run here, by name."""
    made = cache_loader(meta)
    others = [name for name in LOADERS if name != made and not (name == "dali" and dali_missing())]
    return {name: measure_drift(base, device, source, meta, name) for name in others}


def check_renderer(meta: dict, summary: dict, loader: str) -> None:
    """Stage two renders with `loader` (``data.loader`` resolved): the cache's own renderer, or
    another whose recorded drift is below int8's own error (one line says so); else refused in
    one line naming ``data.loader``."""
    made = cache_loader(meta)
    if loader == made:
        return
    drift = (summary.get("renderer_drift") or {}).get(loader)
    if not drift:
        raise UserError(f"data.loader={loader}: the cache's views were rendered with {made}, and how far {loader} "
                        f"moves their targets was not measured when it was made; set data.loader={made}")
    moved = f"feature rel RMS {drift['feat_rel_rms']:.2%}, attention KL {drift['attn_kl']:.1e}"
    bound = f"int8's own {INT8_FEAT_REL_RMS:.2%} / {UINT8_ATTN_KL:.1e}"
    if drift["feat_rel_rms"] > INT8_FEAT_REL_RMS or drift["attn_kl"] > UINT8_ATTN_KL:
        raise UserError(f"data.loader={loader}: the cache was rendered with {made}, and {loader} moves its targets "
                        f"by {moved}, above {bound}; set data.loader={made}")
    print(f"data.loader={loader}: the cache was rendered with {made}; {loader} moves its targets by {moved}, "
          f"below {bound}: training renders with {loader}")
