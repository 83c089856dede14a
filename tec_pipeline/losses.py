"""The two reconstruction losses of TEC (Sec. 2.3)."""
from __future__ import annotations

import torch
from torch import Tensor


def _fp32(x: Tensor) -> Tensor:
    """Losses in at least float32: half-precision softmax and squares lose too much."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def feature_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Eq. 3, ``L_fea = ||M o (Yf - Zf)||^2``: per-patch mean over channels, averaged over masked patches."""
    per_patch = (_fp32(pred) - _fp32(target)).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def attention_loss(pred_logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """Eq. 4, ``L_att = -As log Za`` with ``As = softmax(target / tau)``, ``Za = softmax(pred)``.

    Summed over keys (patches), averaged over batch, query rows and heads.
    """
    target = (_fp32(target_logits) / tau).softmax(dim=-1)
    return -(target * _fp32(pred_logits).log_softmax(dim=-1)).sum(dim=-1).mean()
