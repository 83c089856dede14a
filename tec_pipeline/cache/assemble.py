"""Stage one's write side of the cache: shards assembled in memory, written whole on a thread.

A store writes one whole shard at a time (``CacheWriter.write_shard``): that is what makes a
shard durable before its completion marker, and what lets writers of different shards never
share a file. Batches arrive a few images at a time, so ``ShardAssembler`` collects them into
the shard's arrays; ``BackgroundWriter`` then encodes and writes the full shard while the base
model computes the next one, so compute and storage overlap.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

import numpy as np

WRITE_QUEUE_SHARDS = 1  # shards waiting for the writer: bounds memory at ~3 shards (filling, queued, writing)


class ShardAssembler:
    """One shard's arrays, filled batch by batch in memory, then handed to the writer whole.

    Rows are the shard's images (``images``, a range of image indices, n of them):

    - each target of ``view_targets`` (feat, feat_mean, feat_std, attn, topk_idx): (n, V, ...)
    - ``crop`` (n, V, 5) int32, ``valid`` (n,) uint8, ``label`` (n,) int64 (-1: no label)

    A skipped (undecodable) image's target rows are zeros, as the store expects; ``skipped``
    lists those images with their decode error.
    """

    def __init__(self, shard: int, images: range, keep_raw: bool):
        self.shard, self.images, self.keep_raw = shard, images, keep_raw
        self.data: dict[str, np.ndarray] = {}
        self.raw: list[bytes] = [b""] * len(images)  # source image bytes, for stores that keep them
        self.filled = 0
        self.skipped: list[dict] = []

    def _allocate(self, batch: dict, targets: dict[str, np.ndarray]) -> None:
        """Empty arrays for the whole shard, shaped like the first batch's."""
        n = len(self.images)
        for name, arr in targets.items():
            self.data[name] = np.zeros((n, *arr.shape[1:]), arr.dtype)
        self.data["crop"] = np.zeros((n, *batch["crops"].shape[1:]), np.int32)
        self.data["valid"] = np.zeros(n, np.uint8)
        self.data["label"] = np.full(n, -1, np.int64)

    def add(self, batch: dict, targets: dict[str, np.ndarray]) -> None:
        """Place one batch of this shard's images (a view-loader batch and its targets)."""
        if not self.data:
            self._allocate(batch, targets)
        rows = batch["index"].numpy() - self.images.start
        valid = batch["valid"].numpy()
        for name, arr in targets.items():
            self.data[name][rows] = arr
            self.data[name][rows[~valid]] = 0
        self.data["crop"][rows] = batch["crops"].numpy()
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

    @property
    def raw_images(self) -> Optional[list[bytes]]:
        """The source image bytes to store with the shard; None unless the cache keeps them."""
        return self.raw if self.keep_raw else None


class BackgroundWriter:
    """Writes whole shards on a thread, fed through a bounded queue, so that the next shard's
    compute overlaps this one's encoding and storage. The writer's error is raised in the
    producer at its next ``put`` or at ``close``."""

    def __init__(self, writer, maxsize: int = WRITE_QUEUE_SHARDS):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: Optional[BaseException] = None
        self.bytes_written = 0
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            shard, data, images = item
            try:
                start = time.perf_counter()
                stats = self.writer.write_shard(shard, data, images)
                self.seconds += time.perf_counter() - start
                self.bytes_written += int(stats["bytes"])
            except BaseException as err:  # re-raised in the main thread
                self.error = err

    def put(self, assembled: ShardAssembler) -> None:
        """Queue a full shard (blocks while the queue is full)."""
        self._raise()
        self.queue.put((assembled.shard, assembled.data, assembled.raw_images))

    def close(self) -> None:
        """Wait for every queued shard to be durable; raise the writer's error if any."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        """End the thread after the queued shards (idempotent; raises nothing)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
