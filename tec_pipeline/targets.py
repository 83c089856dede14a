"""Patch-relation enhanced targets (Sec. 2.3): pure functions of the base's outputs, one copy for
stage one and online mode. Running the base itself is `base_targets.compute_targets`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NORM_EPS = 1e-6


@dataclass
class Targets:
    """Enhanced targets of one batch of views, as cached by stage one."""

    feat: Tensor  # Yf (B, L, C), patch-normalized (Eq. 2)
    feat_mean: Tensor  # mu_L (B, C)
    feat_std: Tensor  # sqrt(var_L + eps) (B, C): Y = Yf * std + mean
    attn: Tensor  # As logits (B, k+1, H, L): cls row first, then the top-k rows in rank order
    topk_idx: Tensor  # (B, k) patch indices (0..L-1), descending cls attention


def patch_normalize(y: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 2: ``Yf = (Y - mu_L) / sqrt(var_L + eps)`` over the patch axis, per image and channel.

    The variance is unbiased. Returns (Yf, mu_L, sqrt(var_L + eps)).
    """
    mean = y.mean(dim=1)
    std = (y.var(dim=1, unbiased=True) + eps).sqrt()
    return (y - mean[:, None]) / std[:, None], mean, std


def channel_normalize(y: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Tab. 6c "feature dim.": per-patch normalization over channels (LayerNorm without affine)."""
    mean = y.mean(dim=-1, keepdim=True)
    var = y.var(dim=-1, unbiased=True, keepdim=True)
    return (y - mean) / (var + eps).sqrt()


def query_rows(topk_idx: Tensor) -> Tensor:
    """Query rows of an attention target in the 1+L token axis: cls (0), then the selected patches (+1)."""
    cls = torch.zeros(topk_idx.shape[0], 1, dtype=topk_idx.dtype, device=topk_idx.device)
    return torch.cat([cls, topk_idx + 1], dim=1)


def row_logits(queries: Tensor, keys: Tensor, rows: Tensor | None = None) -> Tensor:
    """Pre-softmax logits ``A[rows] = (q * s)[rows] k^T`` (B, H, R, 1+L) of the query rows `rows`
    (B, R) in the 1+L token axis, all rows when None; `queries` already carry the scale s.

    Computed in at least float32 whatever the autocast around it: the targets keep k+1 of the
    1+L rows, so the product is small, and a half-precision one could overflow for a base with
    large q, k (CLIP, DINOv2)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    if rows is not None:
        B, H, _, D = queries.shape
        queries = queries.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))
    with torch.autocast(queries.device.type, enabled=False):
        return queries.to(dtype) @ keys.to(dtype).transpose(-2, -1)


def select_topk(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Semantic attention target As (Sec. 2.3) from the last block's scaled queries and keys
    (B, H, 1+L, head_dim) over [cls; patches].

    Patches are ranked by the head-mean of the cls query row, ``A[:, :, 0, 1:].mean(heads)``;
    the target keeps the cls row and the k top rows (in rank order), keys restricted to
    patches (cls key dropped). Only those k+1 rows of A are computed.
    Returns (As (B, k+1, H, L), topk_idx (B, k)).
    """
    num_patches = keys.shape[-2] - 1
    if not 0 <= k <= num_patches:
        raise ValueError(f"k={k} must be within 0..{num_patches} (the number of patches)")
    cls = torch.zeros(queries.shape[0], 1, dtype=torch.long, device=queries.device)
    score = row_logits(queries, keys, cls)[:, :, 0, 1:].mean(dim=1)
    topk_idx = score.topk(k, dim=-1, sorted=True).indices
    picked = row_logits(queries, keys, query_rows(topk_idx))  # (B, H, k+1, 1+L)
    return picked[..., 1:].permute(0, 2, 1, 3).contiguous(), topk_idx


def enhance(features: Tensor, queries: Tensor, keys: Tensor, k: int) -> Targets:
    """Base outputs -> enhanced targets: Eq. 2 on the features Y (B, L, C) and the top-k
    attention target from the last block's scaled queries and keys, both in float32."""
    feat, mean, std = patch_normalize(features.float())
    attn, topk_idx = select_topk(queries, keys, k)
    return Targets(feat=feat, feat_mean=mean, feat_std=std, attn=attn, topk_idx=topk_idx)


def feature_target(t: Targets, norm: str) -> Tensor:
    """The feature target for a Tab. 6c mode, recovered from the cached patch-normalized one."""
    if norm == "patch":
        return t.feat
    raw = t.feat * t.feat_std[:, None] + t.feat_mean[:, None]
    if norm == "none":
        return raw
    if norm == "channel":
        return channel_normalize(raw)
    raise ValueError(f"targets.norm='{norm}': expected patch, channel or none")


def attention_rows(mode: str, k: int) -> int:
    """Query rows of the stored target As a Tab. 6f mode reads: the cls row and the first k top-k
    rows (topk), the cls row alone (cls_only, and none, whose reader keeps it so that batch
    shapes stay regular; it is never used). Any k <= k_max is a prefix of the stored rows."""
    if mode not in ("topk", "cls_only", "none"):
        raise ValueError(f"targets.attention='{mode}': expected topk, cls_only or none")
    return k + 1 if mode == "topk" else 1


def attention_target(t: Targets, mode: str, k: int) -> tuple[Tensor, Tensor] | None:
    """The attention target (As rows, their top-k indices) for a Tab. 6f mode."""
    if mode == "none":
        return None
    rows = attention_rows(mode, k)
    k_max = t.topk_idx.shape[1]
    if rows - 1 > k_max:
        raise ValueError(f"targets.k={k} exceeds the k_max={k_max} rows available")
    return t.attn[:, :rows], t.topk_idx[:, :rows - 1]
