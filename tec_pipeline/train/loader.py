"""Stage two's data order and its loader: which image, which stored view and which mask noise
each sample gets, and the planned batches dealt to the loader workers epoch after epoch.

Chunk-aware: decoding a whole cache shard is far cheaper per view than random single-view reads,
so an epoch shuffles the shard order, takes `buffer_shards` shards at a time and shuffles the
images of that window; a batch then touches at most the shards of one or two windows. Online and
pixel runs use the same order over the same shard layout, so a cached and an online run with one
seed see the same batches. Everything in the order is a function of (seed, epoch, position): a
resumed run, any number of loader workers and any split of an effective batch over processes or
accumulation steps give the same samples and masks.

One loader serves the whole run, so its workers live as long as the run and an epoch boundary
costs no restart. Workers that decode and render are processes (a torch DataLoader). Workers that
only read bytes (``data.loader=dali``: the files and the targets) are threads of the training
process (`ThreadedBatches`): reading, copying and decompressing release the GIL, and nothing then
crosses a process boundary, which would copy every target byte once more through shared memory.

``data.prefetch_batches`` (P) bounds the batches made ahead of the step, which on CUDA are all in
pinned host memory: threads start at most P batches beyond the one the step holds, all threads
together, so at most P + 2 batches live at once (P ahead, the step's, and for a moment at the
hand-over the step's previous one); worker processes hold ceil(P / W) each (DataLoader's
prefetch_factor), at most P + W - 1 ahead.
"""
from __future__ import annotations

import copy
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import UserError
from .batches import BatchMaker


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
            yield self.batch_of(plan, b)  # not kept in this frame: a suspended worker holds no batch

    def batch_of(self, plan: EpochPlan, b: int) -> dict:
        """Batch `b` of the epoch `plan`: what the batch maker gives, plus its images, views and masks."""
        batch = self.make_batch(plan.images[b], plan.views[b])
        batch["index"] = torch.from_numpy(plan.images[b].copy())
        batch["view"] = torch.from_numpy(plan.views[b].copy())
        if self.masks is not None:  # drawn here, in the loader workers, off the step's path
            batch["mask_noise"] = self.masks(int(plan.first_samples[b]))
        return batch


class ThreadedBatches:
    """`PlannedBatches` made by `threads` threads of this process, each with its own copy of the batch
    maker (its open shards), delivered in the same order as a DataLoader's workers deliver them.

    A thread starts batch g only when g < (batches the consumer has taken) + `prefetch`: at most
    `prefetch` batches exist beyond the one the consumer holds, made, queued or pinned. The bound
    follows the batch order, so the batch the consumer waits for always has its turn."""

    def __init__(self, dataset: PlannedBatches, threads: int, pin_memory: bool = False,
                 prefetch: int = DataConfig.prefetch_batches):
        self.dataset, self.threads = dataset, max(1, min(threads, len(dataset)))
        self.pin_memory, self.prefetch = pin_memory, max(1, prefetch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        stop, turn = threading.Event(), threading.Condition()
        taken = [0]  # batches handed to the consumer so far
        queues = [queue.Queue() for _ in range(self.threads)]
        threads = [threading.Thread(target=self._work, args=(w, q, stop, turn, taken), daemon=True)
                   for w, q in enumerate(queues)]
        for t in threads:
            t.start()
        try:
            for g in range(len(self.dataset)):
                item = queues[g % self.threads].get()
                with turn:  # batch g is taken: the batches up to g + prefetch may start
                    taken[0] = g + 1
                    turn.notify_all()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped (or failed): release the threads waiting for their turn
            stop.set()
            with turn:
                turn.notify_all()
            for q in queues:
                while not q.empty():
                    q.get_nowait()

    def _work(self, worker: int, out: queue.Queue, stop: threading.Event, turn: threading.Condition,
              taken: list) -> None:
        dataset = copy.copy(self.dataset)
        dataset.make_batch = copy.copy(dataset.make_batch)  # its own open shards
        try:
            for batch in self._batches(dataset, worker, stop, turn, taken):
                if self.pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out.put(batch)
                del batch  # the thread waits for its next turn holding nothing
        except BaseException as err:  # raised in the consumer, with the worker's own message
            out.put(err)

    def _batches(self, dataset: PlannedBatches, worker: int, stop: threading.Event, turn: threading.Condition,
                 taken: list) -> Iterator[dict]:
        """The worker's batches, each started only in its turn (g < taken + prefetch)."""
        batches = dataset.worker_batches(worker, self.threads)
        for g in range(worker, len(dataset), self.threads):
            with turn:
                turn.wait_for(lambda: stop.is_set() or g < taken[0] + self.prefetch)
            if stop.is_set():
                return
            yield next(batches)


def batch_loader(dataset: PlannedBatches, num_workers: int, pin_memory: bool = False,
                 threads: bool = False, prefetch: int = DataConfig.prefetch_batches) -> Iterable[dict]:
    """Batches already collated by the dataset's batch maker: from `num_workers` DataLoader worker
    processes, or with `threads` from as many threads of this process (at least one); `prefetch`
    batches made ahead (``data.prefetch_batches``, the module's docstring)."""
    if threads:
        return ThreadedBatches(dataset, num_workers, pin_memory, prefetch)
    workers = min(num_workers, len(dataset))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=math.ceil(prefetch / workers) if workers else None)


def epoch_loader(plan: EpochPlan, make_batch: BatchMaker, start: int, num_workers: int,
                 pin_memory: bool = False, masks: Optional[Callable[[int], Tensor]] = None) -> Iterable[dict]:
    """A DataLoader over one epoch's batches from `start`; with `masks` (first sample -> noise),
    each batch also carries its "mask_noise"."""
    return batch_loader(PlannedBatches(FixedPlan(plan), len(plan), make_batch, start, len(plan), masks),
                        num_workers, pin_memory)
