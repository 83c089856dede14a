"""One TEC training step's losses (Sec. 2.3): the new model's masked forward, Eq. 3 on the
features and Eq. 4 on the attention rows, their sum; shared by the cached and online paths."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .config import TargetConfig
from .models.tec import TECModel, TECOutput
from .base_targets import autocast, compute_targets
from .targets import Targets, attention_target, feature_target


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


def tec_losses(model: Callable[..., TECOutput], images: Tensor, targets: Targets, cfg: TargetConfig,
               mask_ratio: float = 0.75, noise: Optional[Tensor] = None,
               precision: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """New model forward on masked `images` and both losses; ``loss = L_fea + L_att``.

    `model` is a `TECModel` or its wrapper (DDP, compiled); it has an attention branch exactly
    when ``cfg.attention`` is not "none" (`train.model.model_kwargs`). The forward runs under
    autocast to `precision` (None: float32); the losses take its outputs to float32."""
    att = attention_target(targets, cfg.attention, cfg.k)
    with autocast(images.device, precision):
        out = model(images, topk_idx=att[1] if att is not None else None, mask_ratio=mask_ratio, noise=noise)
    losses = {}
    if out.feat is not None:
        losses["loss_fea"] = feature_loss(out.feat, feature_target(targets, cfg.norm), out.mask)
    if att is not None:
        losses["loss_att"] = attention_loss(out.attn, att[0], cfg.tau)
    losses["loss"] = sum(losses.values())
    return losses


def online_step(base, model: TECModel, optimizer: torch.optim.Optimizer, images: Tensor, cfg: TargetConfig,
                k_max: Optional[int] = None, mask_ratio: float = 0.75,
                noise: Optional[Tensor] = None) -> dict[str, float]:
    """Reference step: base forward -> targets -> new model -> losses -> AdamW update.

    `k_max` (default ``cfg.k``) is how many attention rows the targets keep, as a cache would.
    """
    targets = compute_targets(base, images, cfg.last_layers, k_max if k_max is not None else cfg.k)
    losses = tec_losses(model, images, targets, cfg, mask_ratio, noise)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {name: value.item() for name, value in losses.items()}
