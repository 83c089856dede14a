"""Optimization settings of Tab. 8: scaled learning rate, warmup + half-cycle cosine, AdamW groups."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..config import Config
from ..errors import UserError
from ..rules import scaled_lr

# Parameters named like these are tokens or embeddings: no weight decay (MAE / timm convention).
_NO_DECAY_SUFFIXES = ("token", "pos_embed")


def lr_at(step: float, total_steps: int, warmup_steps: float, lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup to `lr`, then half-cycle cosine down to `min_lr` (Tab. 8).

    `step` counts optimizer updates from 0; the lr of update `step` is returned.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: nn.Parameter, decay_tokens: bool = False) -> bool:
    """Norms, biases (every 1-D parameter) and, unless `decay_tokens`, tokens / position embeddings
    are not decayed. The authors' optimizer (timm's ``add_weight_decay`` with no skip list) decays
    the cls and mask tokens: ``optim.decay_tokens=true``."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or (not decay_tokens and leaf.endswith(_NO_DECAY_SUFFIXES))


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = False) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything `no_weight_decay` names."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # the fixed sin-cos position embedding is a frozen parameter
        (no_decay if no_weight_decay(name, param, decay_tokens) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_lr(optimizer, lr: float) -> None:
    """Apply one schedule value to every group (the schedule is per iteration, not per epoch),
    times the group's ``lr_scale`` where it has one (timm's layer-wise decay groups, Tab. 10)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class Schedule:
    """Tab. 8 in optimizer steps: lr = blr * effective batch / 256, warmup then cosine."""

    batches_per_epoch: int  # micro-batches per epoch and process (a multiple of accum_steps)
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    warmup_steps: float
    lr: float
    effective_batch: int

    def lr_at(self, step: int, min_lr: float) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.lr, min_lr)


def make_schedule(cfg: Config, usable_images: int, num_processes: int, max_steps: Optional[int]) -> Schedule:
    """The run's `Schedule`: epochs of whole effective batches (batch x accumulation x processes).

    `cfg` is any config with ``data.batch_size`` and ``optim.{accum_steps, epochs, warmup_epochs,
    blr}``: stage two's, and fine-tuning's (Tab. 10, 11), which schedule the same way.
    """
    o, batch = cfg.optim, cfg.data.batch_size
    effective = batch * o.accum_steps * num_processes
    steps_per_epoch = usable_images // effective
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size={batch}: {usable_images} usable images make no full effective batch "
                        f"of {effective} (batch x optim.accum_steps x processes)")
    total = max_steps if max_steps is not None else o.epochs * steps_per_epoch
    return Schedule(steps_per_epoch * o.accum_steps, steps_per_epoch, total,
                    o.warmup_epochs * steps_per_epoch, scaled_lr(o.blr, effective), effective)
