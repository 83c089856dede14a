"""The two reconstruction losses of TEC (Sec. 2.3)."""
from __future__ import annotations

from torch import Tensor


def feature_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Eq. 3, ``L_fea = ||M o (Yf - Zf)||^2``: per-patch mean over channels, averaged over masked patches."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def attention_loss(pred_logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """Eq. 4, ``L_att = -As log Za`` with ``As = softmax(target / tau)``, ``Za = softmax(pred)``.

    Summed over keys (patches), averaged over batch, query rows and heads.
    """
    target = (target_logits.float() / tau).softmax(dim=-1)
    return -(target * pred_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()
