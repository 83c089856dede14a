"""Stage two's data order: which image, which stored view and which mask noise each sample gets.

Chunk-aware: decoding a whole cache shard is far cheaper per view than random single-view reads,
so an epoch shuffles the shard order, takes `buffer_shards` shards at a time and shuffles the
images of that window; a batch then touches at most the shards of one or two windows. Online and
pixel runs use the same order over the same shard layout, so a cached and an online run with one
seed see the same batches.

Everything here is a function of (seed, epoch, position): a resumed run, any number of loader
workers and any split of an effective batch over processes or accumulation steps give the
same samples and masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

VIEW_MODES = ("cycle", "random", "fresh")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(v) for v in key]))


def uniform_shards(num_images: int, images_per_shard: int) -> list[range]:
    """The shard layout of a cache with `images_per_shard` (the last shard may be short)."""
    return [range(s, min(s + images_per_shard, num_images)) for s in range(0, num_images, images_per_shard)]


def epoch_order(shards: Sequence[range], valid: Optional[np.ndarray], seed: int, epoch: int,
                buffer_shards: int) -> np.ndarray:
    """Chunk-aware shuffle: random shard order, then a random order inside each window of
    `buffer_shards` consecutive shards; invalid images (valid=0) dropped. Seeded by (seed, epoch)."""
    rng = _rng(seed, epoch, 0x5EED)
    shard_order = rng.permutation(len(shards))
    parts = []
    for w in range(0, len(shard_order), max(buffer_shards, 1)):
        window = np.concatenate([np.arange(shards[s].start, shards[s].stop) for s in shard_order[w:w + buffer_shards]])
        parts.append(window[rng.permutation(len(window))])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if valid is not None:
        order = order[valid[order].astype(bool)]
    return order.astype(np.int64)


def view_indices(images: np.ndarray, seed: int, epoch: int, views: int, mode: str) -> np.ndarray:
    """Which view each image uses in `epoch`: stored view ``epoch mod V`` (cycle), a seeded random
    one of the V (random), or view number `epoch` itself (fresh, online only): the crop drawn by
    (seed, image, epoch), new every epoch and the same on a rerun or resume."""
    if mode == "cycle":
        return np.full(len(images), epoch % views, dtype=np.int64)
    if mode == "fresh":
        return np.full(len(images), epoch, dtype=np.int64)
    if mode == "random":
        return _rng(seed, epoch, 0x71E3).integers(0, views, size=int(images.max(initial=-1)) + 1)[images]
    raise UserError(f"data.view_mode='{mode}': expected one of {', '.join(VIEW_MODES)}")


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch for one process: image and view indices per batch, and where
    each batch starts in the run's sample stream (which fixes its masks, `mask_noise`)."""

    images: np.ndarray  # (num_batches, batch_size)
    views: np.ndarray  # (num_batches, batch_size)
    first_samples: np.ndarray  # (num_batches,)

    def __len__(self) -> int:
        return len(self.images)


def plan_epoch(order: np.ndarray, views: np.ndarray, batch_size: int, num_processes: int = 1,
               process_index: int = 0, max_batches: Optional[int] = None, first_micro: int = 0) -> EpochPlan:
    """Cut the epoch order into global batches (drop the last partial one, keep at most
    `max_batches`, so an epoch holds whole accumulation cycles); keep this process' slice.
    `first_micro` is the run's micro-step count before this epoch."""
    global_batch = batch_size * num_processes
    n = len(order) // global_batch
    n = n if max_batches is None else min(n, max_batches)
    imgs = order[: n * global_batch].reshape(n, num_processes, batch_size)[:, process_index]
    vws = views[: n * global_batch].reshape(n, num_processes, batch_size)[:, process_index]
    starts = first_sample(np.arange(first_micro, first_micro + n, dtype=np.int64), batch_size, num_processes,
                          process_index)
    return EpochPlan(images=np.ascontiguousarray(imgs), views=np.ascontiguousarray(vws), first_samples=starts)


def first_sample(micro_step: int | np.ndarray, batch: int, num_processes: int = 1,
                 process_index: int = 0) -> int | np.ndarray:
    """Position of a micro-batch's first sample in the run's sample stream, as `plan_epoch`
    lays batches out: micro-batch j of process p holds samples j*B*P + p*B ... + B - 1."""
    return (micro_step * num_processes + process_index) * batch


def mask_noise(seed: int, first_sample: int, batch: int, num_patches: int) -> Tensor:
    """Uniform masking noise (B, L) on the CPU: row r from a generator seeded by
    (seed, first_sample + r), the sample's position in the run's stream of samples.

    The masks depend on nothing else, so a cached, an online and a resumed run mask alike, and
    so do 1 process x batch 2B, 1 process x batch B x 2 accumulation steps and 2 processes x
    batch B: the same effective batch gets the same masks however it is split.
    """
    rows = []
    for sample in range(first_sample, first_sample + batch):
        key = np.random.SeedSequence([seed, sample, 0x3A5C]).generate_state(1, np.uint64)[0]
        rows.append(torch.rand(num_patches, generator=torch.Generator().manual_seed(int(key >> np.uint64(1)))))
    return torch.stack(rows)


@dataclass(frozen=True)
class EpochPlanner:
    """`plan_epoch` of any epoch of one run, for one process: what a loader that spans epochs
    needs to plan each one where it starts (picklable, so loader workers plan their own)."""

    shards: Sequence[range]
    valid: Optional[np.ndarray]
    seed: int
    buffer_shards: int
    views: int
    view_mode: str
    batch_size: int
    num_processes: int
    process_index: int
    batches_per_epoch: int

    def __call__(self, epoch: int) -> EpochPlan:
        order = epoch_order(self.shards, self.valid, self.seed, epoch, self.buffer_shards)
        views = view_indices(order, self.seed, epoch, self.views, self.view_mode)
        return plan_epoch(order, views, self.batch_size, self.num_processes, self.process_index,
                          self.batches_per_epoch, first_micro=epoch * self.batches_per_epoch)

