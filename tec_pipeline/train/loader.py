"""A run's batches as one loader: the planned batches dealt to the loader workers in turn, epoch
after epoch, so the workers live as long as the run and an epoch boundary costs no restart.

Workers that decode and render are processes (a torch DataLoader). Workers that only read bytes
(``data.loader=dali``: the files and the targets) are threads of the training process
(`ThreadedBatches`): reading, copying and decompressing release the GIL, and nothing then
crosses a process boundary, which would copy every target byte once more through shared memory.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

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
        return self.worker_batches(*((info.id, info.num_workers) if info is not None else (0, 1)))

    def worker_batches(self, worker: int, workers: int) -> Iterator[dict]:
        """The batches of worker `worker` of `workers`, in order."""
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


class ThreadedBatches:
    """`PlannedBatches` made by `threads` threads of this process, each with its own copy of the batch
    maker (its open shards), delivered in the same order as a DataLoader's workers deliver them."""

    def __init__(self, dataset: PlannedBatches, threads: int, pin_memory: bool = False, prefetch: int = 2):
        self.dataset, self.threads = dataset, max(1, min(threads, len(dataset)))
        self.pin_memory, self.prefetch = pin_memory, prefetch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        stop = threading.Event()
        queues = [queue.Queue(self.prefetch) for _ in range(self.threads)]
        threads = [threading.Thread(target=self._work, args=(w, q, stop), daemon=True) for w, q in enumerate(queues)]
        for t in threads:
            t.start()
        try:
            for g in range(len(self.dataset)):
                item = queues[g % self.threads].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped (or failed): release the threads blocked on full queues
            stop.set()
            for q in queues:
                while not q.empty():
                    q.get_nowait()

    def _work(self, worker: int, out: queue.Queue, stop: threading.Event) -> None:
        dataset = copy.copy(self.dataset)
        dataset.make_batch = copy.copy(dataset.make_batch)  # its own open shards
        try:
            for batch in dataset.worker_batches(worker, self.threads):
                if self.pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if not put(out, batch, stop):
                    return
        except BaseException as err:  # raised in the consumer, with the worker's own message
            put(out, err, stop)


def put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def batch_loader(dataset: PlannedBatches, num_workers: int, pin_memory: bool = False,
                 threads: bool = False) -> Iterable[dict]:
    """Batches already collated by the dataset's batch maker: from `num_workers` DataLoader worker
    processes, or with `threads` from as many threads of this process (at least one)."""
    if threads:
        return ThreadedBatches(dataset, num_workers, pin_memory)
    workers = min(num_workers, len(dataset))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None)


def epoch_loader(plan: EpochPlan, make_batch: BatchMaker, start: int, num_workers: int,
                 pin_memory: bool = False, masks: Optional[Callable[[int], Tensor]] = None) -> Iterable[dict]:
    """A DataLoader over one epoch's batches from `start`; with `masks` (first sample -> noise),
    each batch also carries its "mask_noise"."""
    return batch_loader(PlannedBatches(FixedPlan(plan), len(plan), make_batch, start, len(plan), masks),
                        num_workers, pin_memory)
