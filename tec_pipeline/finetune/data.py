"""Fine-tuning data (Tab. 10, 11): timm's transforms, images whose augmentation is a function of
(seed, epoch, image), seeded epoch orders cut per process, and timm's Mixup / CutMix with the loss
that fits the targets it makes."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Dataset

from ..data.sources import ImageSource
from .config import FinetuneConfig


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, except that 0 bits gives a black image (no bit kept). RandAugment's
    'inc1' posterize keeps 4 - int(4 m / 10) bits, 0 at magnitude 10, which mstd 0.5 around 9 reaches
    in about a fifth of the draws; Pillow >= 10 refuses bits < 1 and training would stop there."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):  # timm looks ops up here when it builds them
    auto_augment.NAME_TO_OP[_name] = posterize


def train_transform(cfg: FinetuneConfig):
    """Tab. 10: RandomResizedCrop (bicubic) + flip + RandAugment(9, 0.5) + random erasing 0.25 (pixel
    mode), ImageNet-normalized; Tab. 11 sets RandAugment and erasing off: crop + flip."""
    a = cfg.aug
    return create_transform(cfg.data.img_size, is_training=True, scale=(a.scale_min, 1.0), color_jitter=None,
                            auto_augment=a.auto_augment or None, interpolation="bicubic", re_prob=a.reprob,
                            re_mode="pixel", re_count=1)


def eval_transform(cfg: FinetuneConfig):
    """Resize to img_size / crop_pct (bicubic), centre crop, normalize (MAE's evaluation)."""
    return create_transform(cfg.data.img_size, is_training=False, interpolation="bicubic",
                            crop_pct=cfg.data.crop_pct)


def seed_everything(*keys: int) -> None:
    """Seed python's, numpy's and torch's global RNGs from `keys`: timm's augmentations, Mixup and
    drop path draw from them, so seeding by (seed, epoch, image) or (seed, micro-step, rank) makes
    those draws the same in any worker and after a resume."""
    s = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class LabelledImages(Dataset):
    """(image tensor, label) of an image source (ImageFolder, webdataset tars), or of its images
    `indices` (a held-out split). A key ``(epoch, index)`` renders a training view with the RNGs
    seeded by (seed, epoch, index); a plain index renders the deterministic eval view."""

    def __init__(self, source: ImageSource, labels: np.ndarray, transform, seed: int = 0,
                 indices: Optional[np.ndarray] = None):
        self.source, self.labels, self.transform, self.seed = source, labels, transform, seed
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if epoch is not None:
            seed_everything(self.seed, epoch, index)
        image = int(self.indices[index])
        return self.transform(self.source.load(image)), int(self.labels[image])


def epoch_keys(num_images: int, seed: int, epoch: int, batch: int, processes: int, rank: int,
               batches: int) -> list[list[tuple[int, int]]]:
    """This process's first `batches` micro-batches of an epoch: a permutation seeded by (seed, epoch),
    cut into global batches of batch x processes, this rank's slice of each; keys ``(epoch, image)``."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(num_images, generator=g).tolist()
    starts = range(0, batches * batch * processes, batch * processes)
    return [[(epoch, i) for i in order[s + rank * batch: s + (rank + 1) * batch]] for s in starts]


def mixup(cfg: FinetuneConfig, num_classes: int) -> Optional[Mixup]:
    """Tab. 10: timm's Mixup (alpha 0.8) or CutMix (alpha 1.0) per batch, label smoothing 0.1 folded
    into the soft targets; None where both are off (Tab. 11)."""
    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                 mode="batch", label_smoothing=a.smoothing, num_classes=num_classes)


def criterion(cfg: FinetuneConfig, mixing: bool) -> nn.Module:
    """Soft-target cross-entropy on Mixup's targets (the smoothing is already in them), else label
    smoothing, else plain cross-entropy (the probe)."""
    if mixing:
        return SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    return nn.CrossEntropyLoss()

