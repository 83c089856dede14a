"""The MAE "pixels" target: TEC with per-patch normalized pixels and no attention target.

Used to train the demo's own base model (`bash scripts/demo.sh`) with the same pipeline: MAE is
TEC whose feature target is the normalized pixels of each patch (MAE's ``norm_pix_loss``), with
no attention branch and no adapters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .targets import Targets

PIXEL_EPS = 1e-6


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, L, p*p*3) in MAE's order (row-major patches, pixel rows, then channels)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch * patch * C)


def pixel_feat_dim(patch: int) -> int:
    """Channels of the pixel target: p*p*3."""
    return patch * patch * 3


def pixel_targets(images: Tensor, patch: int, eps: float = PIXEL_EPS) -> Targets:
    """Per-patch normalized pixels ``(x - mean_patch) / sqrt(var_patch + eps)`` of normalized images.

    Mean and (unbiased) variance are over the p*p*3 values of each patch, as MAE's
    ``norm_pix_loss``. The attention fields are empty: the pixel target has none.
    """
    x = patchify(images.float(), patch)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    feat = (x - mean) / (var + eps).sqrt()
    B, L, _ = feat.shape
    empty_idx = torch.zeros(B, 0, dtype=torch.long, device=feat.device)
    return Targets(
        feat=feat,
        # Per-patch statistics do not fit the per-channel fields; they are not needed because
        # the pixel target is only ever used as is (targets.norm does not apply to it).
        feat_mean=torch.zeros(B, feat.shape[-1], device=feat.device),
        feat_std=torch.ones(B, feat.shape[-1], device=feat.device),
        attn=torch.zeros(B, 1, 0, L, device=feat.device),
        topk_idx=empty_idx,
    )
