"""A run's batches as one DataLoader: the planned batches dealt to the loader workers in turn, epoch
after epoch, so the workers live as long as the run and an epoch boundary costs no restart."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .interfaces import BatchMaker
from .order import EpochPlan


class FixedPlan:
    """One epoch's plan, for a loader over that epoch alone."""

    def __init__(self, plan: EpochPlan):
        self.plan = plan

    def __call__(self, epoch: int) -> EpochPlan:
        return self.plan


class PlannedBatches(IterableDataset):
    """Batches `start` .. `end` - 1 of a run whose epoch e is ``plan_of(e)``, ``per_epoch`` batches
    each (batch g is batch g mod per_epoch of epoch g // per_epoch). Loader worker w of W makes
    batches start+w, start+w+W, ...; the DataLoader takes one batch from each worker in turn, so
    the batch order does not depend on the number of workers.
    """

    def __init__(self, plan_of: Callable[[int], EpochPlan], per_epoch: int, make_batch: BatchMaker, start: int,
                 end: int, masks: Optional[Callable[[int], Tensor]] = None):
        self.plan_of, self.per_epoch, self.make_batch = plan_of, per_epoch, make_batch
        self.start, self.end, self.masks = start, end, masks

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, plan = None, None
        for g in range(self.start + worker, self.end, workers):
            e, b = divmod(g, self.per_epoch)
            if e != epoch:  # a new epoch: its plan, and this worker's views of it read ahead by shard
                epoch, plan = e, self.plan_of(e)
                mine = np.arange(b, min(self.per_epoch, self.end - e * self.per_epoch), workers)
                self.make_batch.expect(plan.images[mine], plan.views[mine])
            batch = self.make_batch(plan.images[b], plan.views[b])
            batch["index"] = torch.from_numpy(plan.images[b].copy())
            batch["view"] = torch.from_numpy(plan.views[b].copy())
            if self.masks is not None:  # drawn here, in the loader workers, off the step's path
                batch["mask_noise"] = self.masks(int(plan.first_samples[b]))
            yield batch


def batch_loader(dataset: PlannedBatches, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over batches already collated by the dataset's batch maker."""
    workers = min(num_workers, len(dataset))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None)


def epoch_loader(plan: EpochPlan, make_batch: BatchMaker, start: int, num_workers: int,
                 pin_memory: bool = False, masks: Optional[Callable[[int], Tensor]] = None) -> DataLoader:
    """A DataLoader over one epoch's batches from `start`; with `masks` (first sample -> noise),
    each batch also carries its "mask_noise"."""
    return batch_loader(PlannedBatches(FixedPlan(plan), len(plan), make_batch, start, len(plan), masks),
                        num_workers, pin_memory)
