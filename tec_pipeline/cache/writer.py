"""The writer logic shared by both stores: whole shards, completion markers, finalizing.

A store subclass supplies the data layout only: ``_init_layout`` (create or reopen,
idempotent), ``_clear_shard`` (remove leftovers of a crashed attempt) and ``_write_encoded``
(write one shard durably, return its files). Everything here is independent of how bytes are
laid out: encoding and its measured error (``encode``, ``codecs``), the order "data durable ->
marker", and the refusal to finalize while a shard is missing. Reading is `reader`.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..errors import StorageError, UserError
from ..files import storage_error, write_bytes
from . import fidelity
from .encode import encode_float_shard
from .pq import PqCodec
from .pq_parts import read_parts, write_parts
from .schema import (
    FORMAT_VERSION, META_FILE, array_specs, dump_json, done_shards, marker_path, num_shards, pq_parts_digest,
    read_markers, shard_range, with_parts_digest,
)
from .storage import fresh_exists, join, read_json


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
    ``direct_io`` (``cache.direct_io``): local shard files bypass the page cache where the store
    and filesystem allow it; the bytes are the same either way.
    """

    direct_io = True
    lock = None  # `lock.CacheLock` of the owning writer (`create_cache(owner=True)`)
    repaired: dict[int, str] = {}  # shards found damaged on reopening and taken as not done: {shard: why}
    feat_codec: Optional[PqCodec] = None  # a pq cache's fitted parts, once recorded (`record_feat_codec`)

    def __init__(self, url: str, fs, root: str, meta: dict):
        self.url, self.fs, self.root, self.meta = url, fs, root, meta
        self.specs = array_specs(meta)
        self.num_shards = num_shards(meta)
        self._done = done_shards(fs, root)
        try:
            self._init_layout()
        except OSError as err:
            raise storage_error(root, "the cache's array layout", err) from None

    def close(self) -> None:
        """Release the cache's writing lock, if this writer holds it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- a pq cache's fitted parts

    def load_feat_codec(self) -> Optional[PqCodec]:
        """The fitted parts the cache's metadata records (read and checked), or None before any are
        recorded; kept as ``feat_codec``. Processes that did not fit them call this once the
        fitting one has recorded them."""
        if self.meta["feat_dtype"] != "pq":
            return None
        meta = read_json(self.fs, join(self.root, META_FILE))["meta"]
        if pq_parts_digest(meta) is not None:
            self.meta = {**self.meta, "identity": meta["identity"]}
            self.feat_codec = read_parts(self.url, self.fs, self.root, meta)
        return self.feat_codec

    def record_feat_codec(self, codec: PqCodec) -> None:
        """Make `codec` this pq cache's parts: written to storage (``pq_parts``), then their digest
        recorded in the metadata's identity, before any shard is done (shards are encoded with them)."""
        if self.meta["feat_dtype"] != "pq":
            raise ValueError(f"cache {self.url} stores {self.meta['feat_dtype']} features: it has no pq parts")
        if self._done or pq_parts_digest(self.meta) is not None:
            raise ValueError(f"cache {self.url}: its pq parts are recorded once, before any shard is written")
        write_parts(self.url, self.fs, self.root, codec)
        path = join(self.root, META_FILE)
        doc = read_json(self.fs, path)
        doc["meta"]["identity"] = with_parts_digest(doc["meta"]["identity"], codec.sha256())
        write_bytes(self.fs, path, dump_json(doc))
        self.meta, self.feat_codec = doc["meta"], codec

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
        arrays, stats = encode_float_shard(data, self.specs, self.meta["feat_dtype"], self.meta["attn_dtype"], rng,
                                           self.feat_codec)
        return self.write_encoded_shard(shard, arrays, stats, images)

    def write_encoded_shard(self, shard: int, enc: dict[str, np.ndarray], stats: dict,
                            images: list[bytes] | None = None) -> dict:
        """Write one whole shard already in its storage dtypes, make it durable, then record its
        completion (the marker: its files and stats).

        ``enc``: every array of ``schema.array_specs``, leading dims [images in shard, views] (or
        [images]); ``stats``: its measured error (``fidelity.error_stats``), returned with
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
            "quantization": fidelity.aggregate_errors(stats),
            "skipped_images": [i for s in stats for i in s["invalid"]],
            "bytes": total, "bytes_per_view": total / views,
        }
        doc["summary"] = json.loads(json.dumps({**summary, **added}, default=str))
        doc["shards"] = {str(s): {"images": markers[s]["images"], "files": markers[s]["files"]}
                         for s in range(self.num_shards)}
        doc["complete"] = True
        write_bytes(self.fs, path, dump_json(doc))
