"""Optimization settings of Tab. 8: scaled learning rate, warmup + half-cycle cosine, AdamW groups."""
from __future__ import annotations

import math

from torch import nn

# Parameters named like these are tokens or embeddings: no weight decay (MAE / timm convention).
_NO_DECAY_SUFFIXES = ("token", "pos_embed")


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Tab. 8 linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def lr_at(step: float, total_steps: int, warmup_steps: float, lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup to `lr`, then half-cycle cosine down to `min_lr` (Tab. 8).

    `step` counts optimizer updates from 0; the lr of update `step` is returned.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases (every 1-D parameter) and tokens / position embeddings are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf.endswith(_NO_DECAY_SUFFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything `no_weight_decay` names."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # the fixed sin-cos position embedding is a frozen parameter
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_lr(optimizer, lr: float) -> None:
    """Apply one schedule value to every group (the schedule is per iteration, not per epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
