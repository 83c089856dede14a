"""Stage one's write side of the cache: shards assembled in memory in their storage dtypes, then
compressed and written whole by a pool of threads.

A store writes one whole shard at a time (``CacheWriter.write_encoded_shard``): that is what
makes a shard durable before its completion marker, and what lets writers of different shards
never share a file. Batches arrive a few images at a time, already encoded on the compute device
(``encode.encode_views``), so ``ShardAssembler`` only places their rows and keeps their measured
error. ``ShardWriterPool`` then compresses and writes full shards on ``threads`` threads, one
shard per thread (zstd releases the GIL), while the base model computes the next ones.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import fidelity
from .encode import BatchChecks, empty_shard, encode_views, measured_views, read_checks
from .pq import PqCodec
from .schema import array_specs, shard_range
from .storage import one_thread_per_shard

WRITE_QUEUE_SHARDS = 1  # full shards waiting for a writer: memory is (threads + 2) shards at most
# Each writer thread holds a shard in memory, so the default is capped: enough threads to keep up
# with one GPU process's targets, without holding more shards than that needs.
MAX_DEFAULT_WRITER_THREADS = 4


def default_writer_threads() -> int:
    """``cache.writer_threads`` when unset: the cores this process may run on, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WRITER_THREADS, cores))


class ShardAssembler:
    """One shard's arrays in their storage dtypes (``schema.array_specs``), filled batch by batch
    on the host, then written whole.

    Rows are the shard's images (n of them): each array of ``codecs.encode`` (n, V, ...), ``crop``
    (n, V, 5) int32, ``valid`` (n,) uint8 and ``label`` (n,) int64 (-1: no label). A skipped
    (undecodable) image's rows are the encoding of zeros, its crop zeros; ``skipped`` lists those
    images with their decode error. ``errors`` holds the measured views' error sums by view.
    """

    def __init__(self, meta: dict, shard: int, keep_raw: bool, arrays: Optional[dict[str, np.ndarray]] = None,
                 pq: Optional[PqCodec] = None):
        self.shard, self.images, self.keep_raw, self.pq = shard, shard_range(meta, shard), keep_raw, pq
        self.feat_dtype, self.attn_dtype, self.views = meta["feat_dtype"], meta["attn_dtype"], int(meta["views"])
        self.sample = fidelity.error_sample(len(self.images), self.views)
        fits = arrays is not None and len(arrays["valid"]) == len(self.images)  # every row is overwritten
        # pinned where a GPU computes the targets: its copies into the rows are then asynchronous
        self.data = arrays if fits else empty_shard(array_specs(meta), len(self.images), self.views,
                                                    pinned=torch.cuda.is_available())
        self.raw: list[bytes] = [b""] * len(self.images)  # source image bytes, for stores that keep them
        self.pending: list[tuple[np.ndarray, BatchChecks]] = []  # (measured view indices, checks) to read
        self.copied: Optional[torch.cuda.Event] = None  # recorded after the last asynchronous copy
        self.errors: dict[int, np.ndarray] = {}
        self.filled = 0
        self.skipped: list[dict] = []

    def _encoded_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Where a batch's encoded rows go: views of the shard's arrays (batches are runs of
        consecutive images), else new arrays that ``add`` then places."""
        names = [name for name in self.data if name not in ("crop", "valid", "label")]
        if len(rows) and (np.diff(rows) == 1).all():
            return {name: self.data[name][rows[0]:rows[-1] + 1] for name in names}
        return {name: np.empty((len(rows), *self.data[name].shape[1:]), self.data[name].dtype) for name in names}

    def add(self, batch: dict, targets: dict[str, Tensor]) -> None:
        """Encode one view-loader batch of this shard's images (targets on their device,
        ``encode.encode_views``) into the shard's rows, with its crops, labels, source bytes and
        the measured error of the views of this shard's sample."""
        rows, valid = batch["index"].numpy() - self.images.start, batch["valid"].numpy()
        pairs = rows[:, None] * self.views + np.arange(self.views)  # the views' indices in the shard
        measure = measured_views(pairs, valid, self.sample)
        out = self._encoded_rows(rows)
        checks = encode_views(targets, batch["valid"], measure, self.feat_dtype, self.attn_dtype,
                              batch["index"].tolist(), out, self.pq)
        for name, arr in out.items():
            if not np.shares_memory(arr, self.data[name]):  # new pageable arrays: the copy has completed
                self.data[name][rows] = arr
        self.pending.append((pairs[measure], checks))
        if targets["feat"].is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        self.data["crop"][rows] = np.where(valid[:, None, None], batch["crops"].numpy(), 0)
        self.data["valid"][rows] = valid
        self.data["label"][rows] = batch["label"].numpy()
        for row, index, ok, error, raw in zip(rows, batch["index"].tolist(), valid, batch["error"], batch["raw"]):
            self.raw[row] = raw
            if not ok:
                self.skipped.append({"index": index, "error": error})
        self.filled += len(rows)

    @property
    def full(self) -> bool:
        return self.filled == len(self.images)

    def finish(self) -> None:
        """Wait for the copies into the rows and read the batches' checks and errors, once per
        shard (``encode.read_checks``); raises on a failed check. Idempotent."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        errors = read_checks([checks for _, checks in self.pending])
        for (views, _), rows in zip(self.pending, errors):
            self.errors.update(zip(views.tolist(), rows))
        self.pending = []

    def stats(self) -> dict:
        """The shard's measured quantization error (``fidelity.error_stats``), in view order."""
        self.finish()
        rows = [self.errors[p] for p in sorted(self.errors)]
        rows = np.asarray(rows, np.float64).reshape(-1, len(fidelity.ERROR_COLUMNS))
        return fidelity.error_stats(rows, self.feat_dtype, self.attn_dtype)

    @property
    def raw_images(self) -> Optional[list[bytes]]:
        """The source image bytes to store with the shard; None unless the cache keeps them."""
        return self.raw if self.keep_raw else None


class ShardWriterPool:
    """Compresses and writes whole shards on `threads` threads fed through a bounded queue, so
    the next shards' compute overlaps these shards' storage. Each thread writes one shard at a
    time, alone (its compression runs on that thread only), so the bytes are the same whatever
    the thread count. A writer's error is raised in the producer at its next ``put`` or at
    ``close``; the other threads finish the shards they hold."""

    def __init__(self, writer, threads: int, maxsize: int = WRITE_QUEUE_SHARDS):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: Optional[BaseException] = None
        self.bytes_written = 0
        self.seconds = 0.0  # thread-seconds spent writing
        self.cpu_seconds = 0.0  # of which on a CPU (compression, copies, system calls)
        self.spare: list[dict[str, np.ndarray]] = []  # arrays of shards written, for the next ones
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name=f"cache-writer-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        with one_thread_per_shard():
            self._write_queued()

    def _write_queued(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                start, cpu = time.perf_counter(), time.thread_time()
                stats = self.writer.write_encoded_shard(item.shard, item.data, item.stats(), item.raw_images)
                with self._lock:
                    self.seconds += time.perf_counter() - start
                    self.cpu_seconds += time.thread_time() - cpu
                    self.bytes_written += int(stats["bytes"])
                    if len(self.spare) <= len(self.threads):
                        self.spare.append(item.data)
            except BaseException as err:  # re-raised in the producer
                with self._lock:
                    self.error = self.error or err

    def assembler(self, shard: int, keep_raw: bool) -> ShardAssembler:
        """A `ShardAssembler` for `shard`, on the arrays of a shard already written when one
        fits: their memory is in place, where new arrays of a few hundred MB would first be
        faulted in page by page, on the thread that fills them."""
        with self._lock:
            arrays = self.spare.pop() if self.spare else None
        return ShardAssembler(self.writer.meta, shard, keep_raw, arrays, self.writer.feat_codec)

    def put(self, assembled: ShardAssembler) -> None:
        """Queue a full shard (blocks while the queue is full), its rows and checks complete."""
        self._raise()
        assembled.finish()
        self.queue.put(assembled)

    def close(self) -> None:
        """Wait for every queued shard to be durable; raise a writer's error if any."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        """End the threads after the queued shards (idempotent; raises nothing)."""
        alive = [t for t in self.threads if t.is_alive()]
        for _ in alive:
            self.queue.put(None)
        for thread in alive:
            thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
