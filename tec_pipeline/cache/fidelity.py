"""How far stored targets are from the exact ones: the error stage one measures on a sample of
each shard's views (``encode.view_errors``), sums that aggregate over shards, and the per-cache
figures ``inspect`` shows and ``verify`` bounds: feature relative RMS ``||x̂ - x|| / ||x||``, mean
cosine per patch ``cos(x̂_p, x_p)``, and attention ``KL(softmax(a / τ) || softmax(â / τ))`` per
row at τ = 1.8; and int8 storage's own error, the bound a renderer's measured drift is held to
(`train.data.check_renderer`)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .codecs import ATTN_STEP, FEAT_MIN_STEP

KL_TAU = 1.8  # the paper's MAE ViT-B temperature (Tab. 9), where the error is reported
ERROR_SAMPLE_VIEWS = 64  # views per shard on which the quantization error is measured
# int8 storage's own error: a uniform rounding error of one step s on a unit-variance feature,
# s / sqrt(12) relative RMS; on the attention logits, of step 0.1, KL ~ Var(d) / (2 tau^2).
INT8_FEAT_REL_RMS = FEAT_MIN_STEP / math.sqrt(12)
UINT8_ATTN_KL = ATTN_STEP ** 2 / 12 / (2 * KL_TAU ** 2)
# The sums measured per view (``encode.view_errors``), so that shards aggregate exactly.
ERROR_COLUMNS = ("feat_sq_err", "feat_sq_ref", "attn_kl_sum", "attn_rows", "feat_cos_sum", "feat_patches")


def attn_kl_rows(ref, approx, tau: float = KL_TAU) -> Tensor:
    """KL(softmax(ref / tau) || softmax(approx / tau)) of every row (last axis), float64
    (arrays or tensors, on ``ref``'s device)."""
    ref = torch.as_tensor(ref).double()
    lp = torch.log_softmax(ref / tau, dim=-1)
    lq = torch.log_softmax(torch.as_tensor(approx, device=ref.device).double() / tau, dim=-1)
    return F.kl_div(lq, lp, reduction="none", log_target=True).sum(dim=-1)  # sum p (log p - log q)


def feat_error_sums(ref, approx) -> tuple[Tensor, Tensor]:
    """``(sum (approx - ref)^2, sum ref^2)`` over the last two axes (L, C), float32 terms and
    (pairwise) sums, returned as float64 (arrays or tensors, on ``ref``'s device)."""
    ref = torch.as_tensor(ref).float()
    diff = torch.as_tensor(approx, device=ref.device).float() - ref
    return (diff * diff).sum(dim=(-2, -1)).double(), (ref * ref).sum(dim=(-2, -1)).double()


def feat_cosine_sums(ref, approx) -> tuple[Tensor, Tensor]:
    """``(sum_p cos(approx_p, ref_p), patches)`` over the patches p (rows of the last axis) of each
    (L, C) view, float64 (arrays or tensors, on ``ref``'s device); a zero patch counts as 0."""
    ref = torch.as_tensor(ref).double()
    cos = F.cosine_similarity(torch.as_tensor(approx, device=ref.device).double(), ref, dim=-1)
    return cos.sum(-1), torch.full_like(cos[..., 0], cos.shape[-1])


def feat_rel_rms(ref, approx) -> float:
    """``||approx - ref|| / ||ref||`` (relative RMS) over everything, float64."""
    err, den = (float(x.sum()) for x in feat_error_sums(ref, approx))
    return float(np.sqrt(err / den)) if den > 0 else float(np.sqrt(err))


def error_sample(images: int, views: int, limit: int = ERROR_SAMPLE_VIEWS) -> np.ndarray:
    """The views of a shard of `images` x `views` whose quantization error is measured, as
    indices ``image * views + view``: up to ``limit`` of them, evenly spread over the shard and
    deterministic. Known from the shard's size alone, so each batch measures its own share; the
    views of skipped images are left out when measured (``measured_views``)."""
    total = images * views
    return np.unique(np.linspace(0, total - 1, min(limit, total)).round().astype(np.int64))


def error_stats(errors: np.ndarray, feat_dtype: str, attn_dtype: str) -> dict:
    """A shard's measured error from its measured views' sums, (P, 6) float64 rows of
    ``ERROR_COLUMNS`` in view order.

    Returns sums (so shards aggregate exactly) and the shard's own values: ``feat_sq_err``,
    ``feat_sq_ref``, ``feat_rel_rms``, ``feat_cos_sum``, ``feat_patches``, ``feat_cosine`` (mean
    over patches of the cosine to the exact target), ``attn_kl_sum``, ``attn_rows``, ``attn_kl``
    (mean over rows of KL at tau = 1.8), ``error_views``. float32 stores are exact and report 0
    (cosine 1).
    """
    sums = np.asarray(errors, np.float64).reshape(-1, len(ERROR_COLUMNS)).sum(axis=0)
    sq_err, sq_ref, kl_sum, rows, cos_sum, patches = (float(x) for x in sums)
    stats = {"error_views": int(len(errors)), "feat_sq_err": 0.0, "feat_sq_ref": 0.0, "feat_rel_rms": 0.0,
             "feat_cos_sum": 0.0, "feat_patches": 0, "feat_cosine": 1.0, "attn_kl_sum": 0.0, "attn_rows": 0,
             "attn_kl": 0.0}
    if feat_dtype != "float32" and len(errors):
        stats.update(feat_sq_err=sq_err, feat_sq_ref=sq_ref, feat_rel_rms=float(np.sqrt(sq_err / max(sq_ref, 1e-300))),
                     feat_cos_sum=cos_sum, feat_patches=int(patches), feat_cosine=cos_sum / max(patches, 1))
    if attn_dtype != "float32" and rows:
        stats.update(attn_kl_sum=kl_sum, attn_rows=int(rows), attn_kl=kl_sum / rows)
    return stats


def aggregate_errors(stats: list[dict]) -> dict:
    """Cache-wide errors from per-shard stats (as returned by ``write_shard``)."""
    sq_err = sum(s.get("feat_sq_err", 0.0) for s in stats)
    sq_ref = sum(s.get("feat_sq_ref", 0.0) for s in stats)
    kl_sum = sum(s.get("attn_kl_sum", 0.0) for s in stats)
    rows = sum(s.get("attn_rows", 0) for s in stats)
    cos_sum, patches = sum(s.get("feat_cos_sum", 0.0) for s in stats), sum(s.get("feat_patches", 0) for s in stats)
    return {"feat_rel_rms": float(np.sqrt(sq_err / sq_ref)) if sq_ref > 0 else 0.0,
            "feat_cosine": cos_sum / patches if patches else 1.0,
            "attn_kl": kl_sum / rows if rows else 0.0,
            "error_views": int(sum(s.get("error_views", 0) for s in stats)),
            "tau": KL_TAU}
