"""One TEC training step: the losses from (images, targets), shared by the cached and online paths."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .config import TargetConfig
from .losses import attention_loss, feature_loss
from .models.tec import TECModel, TECOutput
from .base_targets import autocast, compute_targets
from .targets import Targets, attention_target, feature_target


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
