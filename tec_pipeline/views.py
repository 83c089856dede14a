"""Views: seeded crop parameters and the one rendering function both stages use.

A view is RandomResizedCrop(scale, ratio=(3/4, 4/3), bicubic) + horizontal flip (p=0.5),
fully described by ``(top, left, height, width, flip)`` on the decoded source image.
Parameters come from a generator seeded by (seed, image index, view index), so any view
is reproducible alone, on any worker, in any order.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_array(self) -> np.ndarray:
        return np.asarray(astuple(self), dtype=np.int32)

    @classmethod
    def from_array(cls, a) -> "ViewParams":
        top, left, height, width, flip = (int(v) for v in a)
        return cls(top, left, height, width, bool(flip))


def view_rng(seed: int, image_index: int, view_index: int) -> np.random.Generator:
    """The generator of one view: independent of every other view and of worker order."""
    return np.random.default_rng(np.random.SeedSequence([seed, image_index, view_index]))


def sample_view(seed: int, image_index: int, view_index: int, height: int, width: int,
                scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = RATIO) -> ViewParams:
    """RandomResizedCrop parameters (10 tries at a random area and log-uniform aspect ratio,
    then a centre crop clamped to `ratio`) and a fair coin for the flip."""
    rng = view_rng(seed, image_index, view_index)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    crop = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            crop = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if crop is None:  # centre crop at the closest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        crop = ((height - h) // 2, (width - w) // 2, h, w)
    return ViewParams(*crop, flip=bool(rng.random() < 0.5))


def render_view(image: Image.Image, p: ViewParams, size: int) -> Tensor:
    """Crop, bicubic-resize to `size` x `size`, flip: (3, size, size) uint8, bit-identical for equal params."""
    box = (p.left, p.top, p.left + p.width, p.top + p.height)
    out = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=box)
    if p.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def draw_view(image: Image.Image, seed: int, image_index: int, view_index: int, size: int,
              scale: tuple[float, float] = (0.2, 1.0)) -> tuple[Tensor, ViewParams]:
    """View `view_index` of a decoded source image: its seeded crop (`sample_view`) rendered at
    `size` (`render_view`). Returns (pixels (3, size, size) uint8, crop parameters)."""
    params = sample_view(seed, image_index, view_index, image.height, image.width, scale)
    return render_view(image, params, size), params


@lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on `device`, made once per device so a
    training step copies nothing from the host for them."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 with ImageNet mean/std; done on the compute device."""
    mean, std = _mean_std(images.device)
    return (images.float() / 255.0 - mean) / std
