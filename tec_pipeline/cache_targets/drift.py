"""How far a view's targets move when another renderer draws it, and whether stage two may then
render with it.

Two renderers (`tec_pipeline.render`) resample the same crop with slightly different filters, so
the base sees slightly different pixels and gives slightly different targets. Stage one measures
that drift on a sample of views once the cache is complete (`measure_drift`, recorded in the
cache's summary as ``renderer_drift``). Stage two may train with a renderer other than the
cache's only where the recorded drift is below the error int8 storage already puts in every
target (`train.data.check_renderer`): the model then sees no larger a change than a lossy cache makes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..cache.fidelity import attn_kl_rows
from ..data.sources import BadImageError, ImageSource, image_size
from ..render import LOADERS, ViewRenderer, cache_loader, dali_missing, open_renderer
from ..views import sample_view
from .verify import reference_view

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
