"""The monitor's labelled images and their frozen features (`tec_pipeline.train.monitor`).

Each split (``train.monitor.train`` / ``val``) is opened and checked when the run is set up,
before any training step, and each process decodes its own contiguous block of it once, at the
encoder's input size, to uint8 tensors it keeps. An evaluation then costs the encoder's forward
alone. Features are computed as `eval` computes them (`evaluate.features`: the same resize,
normalization and pooling), on the compute device under the run's autocast, and gathered from
every process in image order, so the score does not depend on how many processes share the work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..config import MonitorConfig
from ..data.sources import ImageSource
from ..errors import UserError
from ..evaluate.features import image_batches, labelled_split, pool_features
from ..views import normalize


@dataclass
class LabelledSet:
    """One split as this process holds it: its block of decoded images and every image's label."""

    path: str
    images: Tensor  # (this process's images, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64: every image's label, in the split's order
    blocks: list[int]  # images per process, in process order (they sum to N)
    fingerprint: str  # the source's content identity (names and sizes)


class Picked:
    """The images of `source` at `indices`, as an `ImageSource` (what `image_batches` reads)."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.source.load(int(self.indices[index]))


def spread(n: int, max_images: int) -> np.ndarray:
    """At most `max_images` of `n` images (0: all), evenly spaced in the split's order, so a
    class-sorted folder keeps every class in proportion without drawing from any generator."""
    if not max_images or n <= max_images:
        return np.arange(n)
    return np.linspace(0, n - 1, max_images).round().astype(np.int64)


def block_sizes(n: int, processes: int) -> list[int]:
    """Images per process when `n` images are cut into `processes` contiguous blocks in order."""
    return [n * (p + 1) // processes - n * p // processes for p in range(processes)]


def labelled(cfg: MonitorConfig, key: str, classes: Optional[list[str]]) -> tuple[ImageSource, np.ndarray, list]:
    """(source, labels, class names) of ``train.monitor.<key>`` (`evaluate.features.labelled_split`;
    `classes`: the train split's, so val agrees); every problem is one line naming the key."""
    path = getattr(cfg, key)
    name = f"train.monitor.{key}={path}"
    try:
        return labelled_split(cfg.kind, path, classes, name, "the monitor")
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(name) else f"{name}: {message}") from None


def open_sets(cfg: MonitorConfig, size: int, processes: int, index: int) -> tuple[LabelledSet, LabelledSet, list]:
    """(train, val, class names): both splits checked, subsampled (``max_images``) and this
    process's block of each decoded at `size` x `size`."""
    if not cfg.train or not cfg.val:
        missing = "train.monitor.val" if cfg.train else "train.monitor.train"
        raise UserError(f"{missing} is empty: the monitor needs a labelled train and val split (or neither)")
    sets, classes = [], None
    for key in ("train", "val"):
        source, labels, classes = labelled(cfg, key, classes)
        picked = spread(len(source), cfg.max_images)
        if key == "train" and len(np.unique(labels[picked])) < 2:
            raise UserError(f"train.monitor.train={cfg.train}: its images are of one class; a score needs two")
        blocks = block_sizes(len(picked), processes)
        start = sum(blocks[:index])
        mine = Picked(source, picked[start:start + blocks[index]])
        try:
            batches = list(image_batches(mine, size, cfg.batch_size))
        except UserError as err:  # an image that does not decode
            raise UserError(f"train.monitor.{key}={getattr(cfg, key)}: {err}") from None
        images = torch.cat(batches) if batches else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        sets.append(LabelledSet(getattr(cfg, key), images, labels[picked], blocks, source.fingerprint()))
    return sets[0], sets[1], classes


def gathered_features(encoder, data: LabelledSet, pool: str, batch_size: int, accelerator) -> np.ndarray:
    """(N, C) float32 frozen features of the whole split, in its order: this process's block
    through `pool_features` on the compute device (under the run's autocast), then every
    process's block gathered. Reads the device: call it only at an evaluation."""
    device, width = accelerator.device, encoder.num_features
    with accelerator.autocast():
        parts = [pool_features(encoder, normalize(batch.to(device)), pool).float()
                 for batch in data.images.split(batch_size)]
    local = torch.cat(parts) if parts else torch.zeros(0, width, device=device)
    if accelerator.num_processes > 1:  # equal shapes for the collective: pad each block to the largest
        most = max(data.blocks)
        padded = torch.zeros(most, width, device=device, dtype=local.dtype)
        padded[:len(local)] = local
        every = accelerator.gather(padded).reshape(accelerator.num_processes, most, width)
        local = torch.cat([every[p, :n] for p, n in enumerate(data.blocks)])
    return local.cpu().numpy()
