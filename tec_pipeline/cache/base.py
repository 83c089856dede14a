"""Writer and reader logic shared by both stores: shards, completion markers, validation.

A store subclass supplies the data layout only:

- writer: ``_init_layout`` (create or reopen, idempotent), ``_clear_shard`` (remove leftovers
  of a crashed attempt) and ``_write_encoded`` (write one shard durably, return its files);
- reader: ``_read_encoded`` (a whole shard) and ``_read_view_encoded`` (one view).

Everything here is independent of how bytes are laid out: encoding and its measured error
(``codecs``), the order "data durable -> marker", and the refusal to finalize or read an
unwritten shard.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any

import numpy as np

from .. import __version__
from ..errors import StorageError, UserError
from ..files import storage_error, write_bytes
from . import codecs
from .encode import encode_float_shard
from .schema import (
    FORMAT_VERSION, META_FILE, CacheCorruptError, array_specs, dump_json, done_shards, marker_path, num_shards,
    read_markers, shard_range,
)
from .storage import RangeReader, fresh_exists, join, read_json

TARGET_KEYS = ("crop", "feat", "feat_step", "feat_mean", "feat_std", "attn", "topk_idx")  # what training reads


class ShardTargets:
    """One shard's training targets kept in their **stored** dtypes (int8 / float16 / uint8 /
    int16 ...), from which ``take`` gathers the views of a batch.

    ``arrays`` are ``[n, views, ...]`` as ``_read_encoded`` returns them (or already decoded
    float32 arrays: then the batch is float32). Dequantization is left to the consumer
    (``train.batches.dequantize_targets``, once per batch on the compute device), so a shard in
    memory costs its stored size, not 4x it in float32.
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


def new_document(meta: dict) -> dict:
    """The root metadata file of a fresh cache."""
    return {"format_version": FORMAT_VERSION, "package_version": __version__, "meta": meta,
            "complete": False, "shards": {}, "summary": {}}


def expected_shapes(meta: dict, n: int) -> dict[str, tuple[int, ...]]:
    V, L, C, H, k = (int(meta[x]) for x in ("views", "num_patches", "feat_dim", "heads", "k_max"))
    return {"crop": (n, V, 5), "feat": (n, V, L, C), "feat_mean": (n, V, C), "feat_std": (n, V, C),
            "attn": (n, V, k + 1, H, L), "topk_idx": (n, V, k), "valid": (n,), "label": (n,)}


class CacheWriter:
    """Writes whole shards of one cache; made by ``create_cache``.

    Several processes may hold writers on the same cache as long as each writes its own
    shards; create (or overwrite) from one process first, then open from the others.
    """

    def __init__(self, url: str, fs, root: str, meta: dict):
        self.url, self.fs, self.root, self.meta = url, fs, root, meta
        self.specs = array_specs(meta)
        self.num_shards = num_shards(meta)
        self._done = done_shards(fs, root)
        try:
            self._init_layout()
        except OSError as err:
            raise storage_error(root, "the cache's array layout", err) from None

    # -- store-specific

    def _init_layout(self) -> None:
        raise NotImplementedError

    def _clear_shard(self, shard: int) -> None:
        raise NotImplementedError

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images: list | None) -> dict[str, int]:
        raise NotImplementedError

    def _marker_fields(self, shard: int) -> dict:
        """What else the store records in a written shard's completion marker (e.g. where samples lie)."""
        return {}

    # -- shards

    def shard_range(self, shard: int) -> range:
        """Image indices of one shard."""
        return shard_range(self.meta, shard)

    def is_done(self, shard: int) -> bool:
        """True once the shard's completion marker exists (by this or another process)."""
        if shard not in self._done and fresh_exists(self.fs, marker_path(self.root, shard)):
            self._done.add(shard)
        return shard in self._done

    def _check_arrays(self, shard: int, data: dict[str, np.ndarray], layout: dict[str, tuple], images) -> None:
        """Every array of one shard present with its (shape, dtype) of `layout` (dtype None: any);
        one entry per image where the cache keeps source images."""
        n = len(self.shard_range(shard))
        missing = [k for k in layout if k not in data]
        if missing:
            raise ValueError(f"shard {shard}: data lacks {', '.join(missing)}")
        for name, (shape, dtype) in layout.items():
            if np.shape(data[name]) != shape:
                raise ValueError(f"shard {shard}: '{name}' has shape {np.shape(data[name])}, expected {shape}")
            if dtype is not None and data[name].dtype != dtype:
                raise ValueError(f"shard {shard}: '{name}' is {data[name].dtype}, stored as {dtype}")
        if self.meta.get("store_images") and (images is None or len(images) != n):
            raise ValueError(f"shard {shard}: store_images needs one entry (bytes or None) per image, "
                             f"got {None if images is None else len(images)} for {n}")

    def write_shard(self, shard: int, data: dict[str, np.ndarray], images: list[bytes] | None = None) -> dict:
        """Encode (on the CPU, ``encode.encode_views``) and write one whole shard of float targets.

        ``data``: see ``expected_shapes`` (leading dims [images in shard, views]); rows of skipped
        images (``valid`` 0) are stored as zeros. ``images``: encoded source images (webdataset
        with ``store_images`` only; ignored otherwise). Returns ``write_encoded_shard``'s stats.
        """
        rng = self.shard_range(shard)
        self._check_arrays(shard, data, {k: (v, None) for k, v in expected_shapes(self.meta, len(rng)).items()}, images)
        arrays, stats = encode_float_shard(data, self.specs, self.meta["feat_dtype"], self.meta["attn_dtype"], rng)
        return self.write_encoded_shard(shard, arrays, stats, images)

    def write_encoded_shard(self, shard: int, enc: dict[str, np.ndarray], stats: dict,
                            images: list[bytes] | None = None) -> dict:
        """Write one whole shard already in its storage dtypes, make it durable, then record its
        completion (the marker: its files and stats).

        ``enc``: every array of ``schema.array_specs``, leading dims [images in shard, views] (or
        [images]); ``stats``: its measured error (``codecs.error_stats``), returned with
        ``bytes``, ``bytes_per_view`` and ``invalid`` (skipped image indices) added. A full disk
        or an I/O error raises ``StorageError`` naming the shard and the file, and no marker is
        written: a rerun writes the shard again. A completed shard is never rewritten.
        """
        if self.is_done(shard):
            raise ValueError(f"cache {self.url}: shard {shard} is already complete")
        rng, V = self.shard_range(shard), int(self.meta["views"])
        self._check_arrays(shard, enc, {name: ((len(rng), V) + s.tail if s.per_view else (len(rng),), np.dtype(s.dtype))
                                        for name, s in self.specs.items()}, images)
        try:
            self._clear_shard(shard)
            files = self._write_encoded(shard, enc, images if self.meta.get("store_images") else None)
        except StorageError as err:
            raise StorageError(f"shard {shard}: {err}") from None
        total, views = int(sum(files.values())), len(rng) * V
        stats = {**stats, "shard": shard, "images": len(rng), "views": views, "bytes": total,
                 "bytes_per_view": total / views, "invalid": [rng[i] for i in np.flatnonzero(enc["valid"] == 0)]}
        marker = {"shard": shard, "images": [rng.start, rng.stop], "files": files, "stats": stats,
                  **self._marker_fields(shard)}
        write_bytes(self.fs, marker_path(self.root, shard), dump_json(marker),  # only after the data
                    f"the completion marker of shard {shard}")
        self._done.add(shard)
        return stats

    def finalize(self, summary: dict) -> None:
        """Record ``complete=True``, the shard listing and the summary, once every shard is done
        (raises otherwise; does nothing on a cache already complete).

        The summary gets ``quantization`` (errors aggregated over all shards' markers, so a
        resumed run reports the whole cache), ``skipped_images``, ``bytes`` and
        ``bytes_per_view`` added to what the caller passes.
        """
        path = join(self.root, META_FILE)
        doc = read_json(self.fs, path)
        if doc.get("complete"):
            return  # immutable once complete: a rerun over a finished cache changes nothing
        markers = read_markers(self.fs, self.root)
        missing = [s for s in range(self.num_shards) if s not in markers]
        if missing:
            raise UserError(f"cache {self.url}: {len(missing)} of {self.num_shards} shards are not written "
                            f"(first {missing[:5]}); cannot finalize")
        stats = [markers[s]["stats"] for s in range(self.num_shards)]
        total = int(sum(s["bytes"] for s in stats))
        views = int(self.meta["num_images"]) * int(self.meta["views"])
        added: dict[str, Any] = {
            "quantization": codecs.aggregate_errors(stats),
            "skipped_images": [i for s in stats for i in s["invalid"]],
            "bytes": total, "bytes_per_view": total / views,
        }
        doc["summary"] = json.loads(json.dumps({**summary, **added}, default=str))
        doc["shards"] = {str(s): {"images": markers[s]["images"], "files": markers[s]["files"]}
                         for s in range(self.num_shards)}
        doc["complete"] = True
        write_bytes(self.fs, path, dump_json(doc))


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

    def _read_file(self, shard: int, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` (all by default) of a shard's data file `rel`, checked against the
        size its completion marker recorded: a missing or short file is `CacheCorruptError`."""
        files = self._marker(shard)["files"]
        if rel not in files:
            raise self._fail(shard, f"no record of file {rel}")
        path, size = join(self.root, rel), int(files[rel])
        try:
            data = self._files.read(path, start, end)
        except FileNotFoundError:
            raise self._fail(shard, f"file {path} is missing") from None
        if len(data) != (size if start is None else end - start):
            raise self._fail(shard, f"file {path} is truncated ({size} bytes were written)")
        return data

    def __getstate__(self) -> dict:
        # Readers travel to DataLoader workers: caches (open descriptors, lru wrappers) stay behind.
        keep = ("url", "_fs", "_fs_pid", "root", "doc", "meta", "num_images", "views", "num_shards", "_markers")
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

    def missing_shards(self) -> list[int]:
        """Shards without a completion marker (re-read: other processes may be writing)."""
        if not self.is_complete():
            for shard in done_shards(self.fs, self.root):
                self._markers.setdefault(shard, None)
        return [s for s in range(self.num_shards) if s not in self._markers]

    def shard_range(self, shard: int) -> range:
        return shard_range(self.meta, shard)

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
        return codecs.decode(enc, self.meta["feat_dtype"], self.meta["attn_dtype"])

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardTargets:
        """A shard's training targets (``TARGET_KEYS``) in their stored dtypes, for training
        batches (``ShardTargets.take``); same checks as ``read_shard``. ``wanted`` (local image
        and view indices) names the views the caller will take, so a store can read just those;
        stores may also defer reading and decoding until views are taken."""
        self._marker(shard)
        return ShardTargets(self._read_encoded(shard))

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        """One view of one image, decoded as in ``read_shard`` without the leading dims."""
        if not (0 <= image < self.num_images and 0 <= view < self.views):
            raise IndexError(f"(image {image}, view {view}) outside {self.num_images} images x {self.views} views")
        shard = image // int(self.meta["images_per_shard"])
        self._marker(shard)
        enc = self._read_view_encoded(shard, image - self.shard_range(shard).start, view)
        return codecs.decode(enc, self.meta["feat_dtype"], self.meta["attn_dtype"])

    def image_bytes(self, image: int) -> bytes | None:
        """The encoded source image (webdataset caches made with ``store_images``), else None."""
        return None

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        """Stored bytes of those views' training targets: the least an epoch that takes them reads."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes on storage, all files of the cache included."""
        return int(self.fs.du(self.root, total=True))
