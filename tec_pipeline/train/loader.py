"""One epoch's batches as a DataLoader: the plan's batches dealt to the loader workers in turn."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .interfaces import BatchMaker
from .order import EpochPlan


class EpochDataset(IterableDataset):
    """The batches of one epoch from `start`; loader worker w makes batches start+w, start+w+W, ...

    The DataLoader takes one batch from each worker in turn, so the batch order does not
    depend on the number of workers.
    """

    def __init__(self, plan: EpochPlan, make_batch: BatchMaker, start: int = 0,
                 masks: Optional[Callable[[int], Tensor]] = None):
        self.plan, self.make_batch, self.start, self.masks = plan, make_batch, start, masks

    def __len__(self) -> int:
        return max(len(self.plan) - self.start, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(self.start + worker, len(self.plan), workers)
        if len(mine):  # this worker's views of the epoch, read ahead by shard
            self.make_batch.expect(self.plan.images[mine.start::workers], self.plan.views[mine.start::workers])
        for b in mine:
            batch = self.make_batch(self.plan.images[b], self.plan.views[b])
            batch["index"] = torch.from_numpy(self.plan.images[b].copy())
            batch["view"] = torch.from_numpy(self.plan.views[b].copy())
            if self.masks is not None:  # drawn here, in the loader workers, off the step's path
                batch["mask_noise"] = self.masks(int(self.plan.first_samples[b]))
            yield batch


def epoch_loader(plan: EpochPlan, make_batch: BatchMaker, start: int, num_workers: int,
                 pin_memory: bool = False, masks: Optional[Callable[[int], Tensor]] = None) -> DataLoader:
    """A DataLoader over one epoch's batches (already collated by `make_batch`); with `masks`
    (first sample -> noise), each batch also carries its "mask_noise"."""
    workers = min(num_workers, max(len(plan) - start, 0))
    return DataLoader(EpochDataset(plan, make_batch, start, masks), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None)
