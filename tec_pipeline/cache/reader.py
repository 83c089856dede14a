"""The reader logic shared by both stores: completion records, checked reads, training targets.

A store subclass supplies ``_read_encoded`` (a whole shard) and ``_read_view_encoded`` (one
view), and may override ``open_shard`` to read only the views a batch or an epoch takes.
Every read refuses an unwritten shard and names the shard of a missing or truncated file.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from . import codecs
from .owned import damaged_shards
from .pq_parts import read_parts
from .schema import CacheCorruptError, array_specs, done_shards, marker_path, num_shards, pq_parts_digest, shard_range
from .storage import RangeReader, fresh_exists, join, read_json

TARGET_KEYS = ("crop", "feat", "feat_step", "feat_mean", "feat_std", "attn", "topk_idx")  # what training reads


class ShardBuffer:
    """One shard's training targets kept in their **stored** dtypes (int8 / float16 / uint8 /
    int16 ...), from which ``take`` gathers the views of a batch.

    ``arrays`` are ``[n, views, ...]`` as ``_read_encoded`` returns them (or already decoded
    float32 arrays: then the batch is float32). Dequantization is left to the consumer
    (``codecs.decode_batch`` with the reader's ``feat_codec``, once per batch on the compute
    device), so a shard in memory costs its stored size, not 4x it in float32.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {name: arrays[name] for name in TARGET_KEYS if name in arrays}

    def _rows(self, name: str, a: np.ndarray, attn_rows: int) -> np.ndarray:
        if name == "attn":
            return a[:, :, :attn_rows]
        if name == "topk_idx":
            return a[:, :, :max(attn_rows - 1, 0)]
        return a

    def fields(self, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """(dtype, per-view shape) of each array ``take`` returns."""
        return {name: (a.dtype, self._rows(name, a, attn_rows).shape[2:]) for name, a in self.arrays.items()}

    def batch_arrays(self, n: int, attn_rows: int) -> dict[str, np.ndarray]:
        """Empty arrays for `n` views shaped by `fields`, for a ``take`` that fills them piece by piece."""
        return {name: np.empty((n,) + shape, dtype) for name, (dtype, shape) in self.fields(attn_rows).items()}

    def destination(self, n: int, attn_rows: int, out: dict[str, np.ndarray] | None,
                    at: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Where a ``take`` of `n` views writes: the caller's (`out`, `at`), or `batch_arrays` and rows 0..n-1."""
        if out is not None:
            return out, np.asarray(at)
        return self.batch_arrays(n, attn_rows), np.arange(n)

    def take(self, local: np.ndarray, views: np.ndarray, attn_rows: int,
             out: dict[str, np.ndarray] | None = None, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Views ``(local[j], views[j])`` stacked on a new leading batch dim: ``attn`` keeps its
        first ``attn_rows`` query rows, ``topk_idx`` its first ``attn_rows - 1`` ranks.

        With ``out`` (arrays shaped by ``fields``) view j is written to ``out[name][at[j]]``
        instead, so the views of a batch spread over several shards land in one array."""
        if out is None:
            return {name: np.ascontiguousarray(self._rows(name, a, attn_rows)[local, views])
                    for name, a in self.arrays.items()}
        for name, a in self.arrays.items():
            out[name][at] = self._rows(name, a, attn_rows)[local, views]
        return out


def target_fields(meta: dict, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """(stored dtype, per-view shape) of each training array a batch takes: ``attn`` keeps its
    first ``attn_rows`` query rows, ``topk_idx`` its first ``attn_rows - 1`` ranks."""
    out = {}
    for name, spec in array_specs(meta).items():
        if name in TARGET_KEYS:
            tail = spec.tail
            if name == "attn":
                tail = (min(attn_rows, tail[0]),) + tail[1:]
            elif name == "topk_idx":
                tail = (min(max(attn_rows - 1, 0), tail[0]),)
            out[name] = (np.dtype(spec.dtype).newbyteorder("<"), tail)
    return out


class CacheReader:
    """Reads a cache written by ``CacheWriter``; made by ``open_cache``.

    ``read_shard`` decodes a whole shard (the fast path for training: shuffle shards, then
    views within an in-memory buffer); ``read_view`` reads one view by random access. Both
    refuse shards that are not recorded complete, and raise ``CacheCorruptError`` naming the
    shard when files are missing, truncated or fail their checksums.
    """

    def __init__(self, url: str, fs, root: str, doc: dict):
        self.url, self._fs, self._fs_pid, self.root, self.doc = url, fs, os.getpid(), root, doc
        self.meta = doc["meta"]
        self.num_images = int(self.meta["num_images"])
        self.views = int(self.meta["views"])
        self.num_shards = num_shards(self.meta)
        # a pq cache's fitted parts (`pq_parts`), which its codes decode with; None: not pq, or none recorded yet
        self.feat_codec = read_parts(url, fs, root, self.meta) if pq_parts_digest(self.meta) is not None else None
        self._load_markers()
        self._reset_caches()

    def _load_markers(self) -> None:
        """Complete: the listing in the metadata file. Otherwise the marker names; each
        marker is read when its shard is first used."""
        if self.is_complete():
            self._markers = {int(s): m for s, m in self.doc["shards"].items()}
        else:
            self._markers = dict.fromkeys(done_shards(self.fs, self.root))

    def _reset_caches(self) -> None:
        """(Re)create per-process read caches; called on open, after unpickling and in a new process."""
        self._files = RangeReader(lambda: self.fs)

    def _fail(self, shard: int, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"cache {self.url} shard {shard}: {what}")

    def _recorded_file(self, shard: int, rel: str) -> tuple[str, int]:
        """(path, size) of a shard's data file `rel` as its completion marker recorded it."""
        files = self._marker(shard)["files"]
        if rel not in files:
            raise self._fail(shard, f"no record of file {rel}")
        return join(self.root, rel), int(files[rel])

    def _read_file(self, shard: int, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` (all by default) of a shard's data file `rel`, checked against the
        size its completion marker recorded: a missing or short file is `CacheCorruptError`."""
        path, size = self._recorded_file(shard, rel)
        try:
            data = self._files.read(path, start, end)
        except FileNotFoundError:
            raise self._fail(shard, f"file {path} is missing") from None
        if len(data) != (size if start is None else end - start):
            raise self._fail(shard, f"file {path} is truncated ({size} bytes were written)")
        return data

    def __getstate__(self) -> dict:
        # Readers travel to DataLoader workers: caches (open descriptors, lru wrappers) stay behind.
        keep = ("url", "_fs", "_fs_pid", "root", "doc", "meta", "num_images", "views", "num_shards", "_markers",
                "feat_codec")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    @property
    def fs(self):
        """The cache's filesystem in this process. Object-store clients (s3fs) run an event loop
        that a forked loader worker does not inherit, so a new process makes its own (an fsspec
        filesystem pickles as its constructor arguments) and its read caches anew."""
        if self._fs_pid != os.getpid():
            self._fs, self._fs_pid = pickle.loads(pickle.dumps(self._fs)), os.getpid()
            self._reset_caches()
        return self._fs

    # -- store-specific

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _read_view_encoded(self, shard: int, local: int, view: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- state

    def is_complete(self) -> bool:
        return bool(self.doc.get("complete"))

    @property
    def summary(self) -> dict:
        """What stage one recorded when it finished (skipped images, bytes, error); {} before."""
        return self.doc.get("summary") or {}

    def missing_shards(self) -> list[int]:
        """Shards without a completion marker (re-read: other processes may be writing)."""
        if not self.is_complete():
            for shard in done_shards(self.fs, self.root):
                self._markers.setdefault(shard, None)
        return [s for s in range(self.num_shards) if s not in self._markers]

    def shard_range(self, shard: int) -> range:
        return shard_range(self.meta, shard)

    def damaged_shards(self) -> dict[int, str]:
        """{shard: why} of the shards recorded complete whose files storage no longer has as they
        were written (missing, or another size): one listing, no data read."""
        return damaged_shards(self.fs, self.root, self.doc)

    def _marker(self, shard: int) -> dict:
        """The completion record of a shard (its files and sizes); refuses unwritten shards."""
        if self._markers.get(shard) is None:
            path = marker_path(self.root, shard)
            if not self.is_complete() and fresh_exists(self.fs, path):
                self._markers[shard] = read_json(self.fs, path)
            else:
                self.shard_range(shard)  # IndexError when out of range
                raise CacheCorruptError(f"cache {self.url}: shard {shard} is not written (the cache is incomplete)")
        return self._markers[shard]

    # -- data

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """All views of a shard, decoded: float32 feat/feat_mean/feat_std/attn, int64
        topk_idx, int32 crop ``[n, views, ...]``; uint8 valid, int64 label ``[n]``."""
        self._marker(shard)
        enc = self._read_encoded(shard)
        return codecs.decode(enc, self.meta["feat_dtype"], self.meta["attn_dtype"], self.feat_codec)

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardBuffer:
        """A shard's training targets (``TARGET_KEYS``) in their stored dtypes, for training
        batches (``ShardBuffer.take``); same checks as ``read_shard``. ``wanted`` (local image
        and view indices) names the views the caller will take, so a store can read just those;
        stores may also defer reading and decoding until views are taken."""
        self._marker(shard)
        return ShardBuffer(self._read_encoded(shard))

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        """One view of one image, decoded as in ``read_shard`` without the leading dims."""
        if not (0 <= image < self.num_images and 0 <= view < self.views):
            raise IndexError(f"(image {image}, view {view}) outside {self.num_images} images x {self.views} views")
        shard = image // int(self.meta["images_per_shard"])
        self._marker(shard)
        enc = self._read_view_encoded(shard, image - self.shard_range(shard).start, view)
        return codecs.decode(enc, self.meta["feat_dtype"], self.meta["attn_dtype"], self.feat_codec)

    def image_bytes(self, image: int) -> bytes | None:
        """The encoded source image (webdataset caches made with ``store_images``), else None."""
        return None

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        """Stored bytes of those views' training targets: the least an epoch that takes them reads."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes on storage, all files of the cache included."""
        return int(self.fs.du(self.root, total=True))


def equal_arrays(a: CacheReader, b: CacheReader) -> dict[str, bool]:
    """Per stored array (decoded, `CacheReader.read_shard`), whether caches `a` and `b` hold it
    equal in every shard: a grown cache against the same cache made at once."""
    equal: dict[str, bool] = {}
    for shard in range(a.num_shards):
        x, y = a.read_shard(shard), b.read_shard(shard)
        for name in x:
            equal[name] = equal.get(name, True) and name in y and np.array_equal(x[name], y[name])
    return equal
