"""Cache schema: metadata checks, array layout, identity comparison, markers and file helpers.

A cache (README "Stage one: the target cache") is a directory or fsspec URL holding

- ``tec_cache.json``: format version, ``meta`` (sizes, dtypes, the ``identity`` of the run
  that made it), the per-shard completion listing, the ``complete`` flag and the summary;
- ``_done/shard-NNNNN.json``: one completion marker per shard, written only after that
  shard's data is durable. The markers are the truth while a cache is being written (several
  processes write disjoint shards and never touch a shared file); ``finalize`` folds them
  into ``tec_cache.json``;
- the data: a zarr v3 group (``zarr_store``) or webdataset tars (``wds_store``).
"""
from __future__ import annotations

import json
import os
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np

from ..config import flatten
from ..errors import UserError
from ..files import is_local

# 2: in each shard file the chunks of one view index lie together (view-major), so an epoch that
# uses one view per image reads one contiguous range per shard and array (README "Stage two:
# training"); version 1 stored them image by image.
FORMAT_VERSION = 2
META_FILE = "tec_cache.json"
DONE_DIR = "_done"

STORES = ("zarr", "webdataset")
FEAT_DTYPES = ("float32", "float16", "int8")
ATTN_DTYPES = ("float32", "float16", "uint8")
REQUIRED_META = ("store", "num_images", "views", "num_patches", "feat_dim", "heads", "k_max",
                 "images_per_shard", "feat_dtype", "attn_dtype", "zstd_level", "identity")
# Meta keys that fix the on-storage layout: a reopened cache must agree on them too, or a
# resumed run would write shards that do not fit the ones already there.
LAYOUT_KEYS = ("store", "num_images", "views", "num_patches", "feat_dim", "heads", "k_max",
               "images_per_shard", "feat_dtype", "attn_dtype", "zstd_level", "store_images",
               "max_part_bytes")
DEFAULT_MAX_PART_BYTES = 256 * 2**20  # webdataset: tar parts of at most ~256 MiB
# zstd (numcodecs releases the GIL while compressing) runs on a few threads when one shard is
# written alone (``CacheWriter.write_shard`` from a caller's thread); a writer pool's threads
# write one shard each instead (``one_thread_per_shard``).
WRITE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
_write_threads = threading.local()

# Arrays indexed [image, view, ...] ("per view") and [image] ("per image").
VIEW_ARRAYS = ("crop", "feat", "feat_mean", "feat_std", "attn", "topk_idx")
IMAGE_ARRAYS = ("valid", "label")
DATA_KEYS = VIEW_ARRAYS + IMAGE_ARRAYS


class CacheMismatchError(UserError):
    """An existing cache was made by a different configuration than this run's."""


class CacheCorruptError(UserError):
    """A shard's files are missing, truncated or fail their checksums."""


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: trailing shape after the leading [image] or [image, view] dims."""

    name: str
    tail: tuple[int, ...]
    dtype: str  # numpy dtype name as stored
    per_view: bool = True


def normalize_meta(meta: dict) -> dict:
    """Check the metadata a writer needs and return it JSON-normalized (tuples -> lists).

    Unknown keys are kept: they are recorded as given.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"cache meta lacks {', '.join(missing)}")
    meta = json.loads(json.dumps(meta))
    meta.setdefault("store_images", False)
    if meta["store"] == "webdataset":
        meta.setdefault("max_part_bytes", DEFAULT_MAX_PART_BYTES)
    for key, choices in (("store", STORES), ("feat_dtype", FEAT_DTYPES), ("attn_dtype", ATTN_DTYPES)):
        if meta[key] not in choices:
            raise UserError(f"cache.{key}='{meta[key]}': expected one of {', '.join(choices)}")
    if meta["store_images"] and meta["store"] != "webdataset":
        raise UserError("cache.store_images=true needs cache.store=webdataset")
    for key in ("num_images", "views", "num_patches", "feat_dim", "heads", "images_per_shard"):
        if int(meta[key]) < 1:
            raise UserError(f"cache meta {key}={meta[key]}: must be >= 1")
    if not 1 <= int(meta["k_max"]) <= int(meta["num_patches"]):  # zarr cannot chunk a 0-length axis;
        # k = 0 (the cls row only) is a prefix of any k_max >= 1
        raise UserError(f"cache.k_max={meta['k_max']}: must be within 1..{meta['num_patches']}")
    if not isinstance(meta["identity"], dict):
        raise ValueError("cache meta 'identity' must be a dict")
    return meta


def array_specs(meta: dict) -> dict[str, ArraySpec]:
    """The stored arrays and their storage dtypes for this metadata.

    Why these dtypes: int8 features carry a per (view, channel) step array ``feat_step``
    (float16, ~1.5 KB/view at C=768); mean/std follow the feature precision (float16 unless
    float32 is asked for: 3 KB instead of 6 KB per view); top-k indices fit int16.
    """
    L, C, H, k = (int(meta[x]) for x in ("num_patches", "feat_dim", "heads", "k_max"))
    feat_dtype, attn_dtype = meta["feat_dtype"], meta["attn_dtype"]
    stat_dtype = "float32" if feat_dtype == "float32" else "float16"
    specs = [
        ArraySpec("crop", (5,), "int32"),
        ArraySpec("feat", (L, C), feat_dtype),
        ArraySpec("feat_mean", (C,), stat_dtype),
        ArraySpec("feat_std", (C,), stat_dtype),
        ArraySpec("attn", (k + 1, H, L), attn_dtype),
        ArraySpec("topk_idx", (k,), "int16" if L <= np.iinfo(np.int16).max else "int32"),
        ArraySpec("valid", (), "uint8", per_view=False),
        ArraySpec("label", (), "int64", per_view=False),
    ]
    if feat_dtype == "int8":
        specs.insert(2, ArraySpec("feat_step", (C,), "float16"))
    return {s.name: s for s in specs}


def num_shards(meta: dict) -> int:
    n, s = int(meta["num_images"]), int(meta["images_per_shard"])
    return (n + s - 1) // s


def shard_range(meta: dict, shard: int) -> range:
    """Image indices of one shard: ``[shard * S, min((shard + 1) * S, N))``."""
    if not 0 <= shard < num_shards(meta):
        raise IndexError(f"shard {shard} out of range 0..{num_shards(meta) - 1}")
    s = int(meta["images_per_shard"])
    return range(shard * s, min((shard + 1) * s, int(meta["num_images"])))


# ----------------------------------------------------------------------------- identity


def short_value(value: Any, other: Any) -> str:
    """A value for a one-line message: long strings cut to 12 characters + '..' unless
    cutting would hide the difference."""
    text, other_text = str(value), str(other)
    if len(text) > 16 and text[:12] != other_text[:12]:
        return text[:12] + ".."
    return text


def first_difference(old: dict, new: dict, shared_only: bool = False) -> tuple[str, Any, Any] | None:
    """The first key (dotted, sorted) whose value differs between two nested dicts; with
    `shared_only`, keys only one of them holds are not compared."""
    a, b = flatten(old), flatten(new)
    for key in sorted(set(a) & set(b) if shared_only else set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            return key, a.get(key, "<missing>"), b.get(key, "<missing>")
    return None


def check_same_cache(url: str, old_meta: dict, new_meta: dict) -> None:
    """Raise CacheMismatchError naming the first differing identity or layout key."""
    diff = first_difference(old_meta.get("identity", {}), new_meta["identity"])
    if diff is None:
        diff = first_difference({k: old_meta.get(k) for k in LAYOUT_KEYS},
                                {k: new_meta.get(k) for k in LAYOUT_KEYS})
        if diff is not None:
            diff = ("cache." + diff[0],) + diff[1:]
    if diff is not None:
        key, was, now = diff
        raise CacheMismatchError(
            f"cache {url} was made with {key}={short_value(was, now)}, this run has {short_value(now, was)}; "
            "use --overwrite to replace it")


# ----------------------------------------------------------------------------- files


def fs_root(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a local path or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/") or "/"


def use_storage_options(url: str, options: dict) -> None:
    """Make ``cache.storage_options`` the defaults of `url`'s filesystem protocol in this process
    (fsspec's own per-protocol configuration, ``fsspec.config.conf``), so every opening of the
    cache, in either stage and in their loader workers, reaches the same endpoint with the same
    credentials. Without options, s3fs reads the environment and ``~/.aws`` as botocore does."""
    if options:
        protocol = fsspec.utils.get_protocol(url)
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def check_bucket(fs: fsspec.AbstractFileSystem, url: str, root: str) -> None:
    """Refuse, with one line, a cache in a bucket that does not exist (object stores would
    otherwise create it on the first write)."""
    if is_local(fs) or root.startswith("/"):  # local disks and memory:// have no buckets
        return
    bucket = root.split("/", 1)[0]
    if bucket == root:  # --overwrite replaces the cache's folder: never a whole bucket
        raise UserError(f"{url}: give the cache a folder inside the bucket, e.g. {url.rstrip('/')}/my_cache.zarr")
    with storage_errors(url):
        found = fs.exists(bucket)
    if not found:
        raise UserError(f"{url}: bucket '{bucket}' does not exist (create it, or check cache.storage_options)")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Storage that refuses us (no credentials, access denied, unreachable endpoint) as one line
    naming the URL, instead of a client library's traceback."""
    try:
        yield
    except PermissionError as err:
        raise UserError(f"{url}: access denied ({err}); check the credentials or cache.storage_options") from None
    except (ConnectionError, TimeoutError) as err:
        raise UserError(f"{url}: storage not reachable ({err})") from None
    except Exception as err:  # botocore's credential and endpoint errors share no stdlib base class
        if type(err).__module__.split(".")[0] not in ("botocore", "aiobotocore"):
            raise
        raise UserError(f"{url}: {type(err).__name__}: {err}") from None


def join(*parts: str) -> str:
    return posixpath.join(*parts)


@contextmanager
def one_thread_per_shard() -> Iterator[None]:
    """Within the block, a shard written from this thread is compressed on this thread alone
    (a writer pool's threads each write their own shard; ``parallel_map`` then runs serially)."""
    before = getattr(_write_threads, "value", None)
    _write_threads.value = 1
    try:
        yield
    finally:
        _write_threads.value = before


def parallel_map(fn: Callable, items: Sequence, threads: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a few threads (default: ``WRITE_THREADS``, or one inside
    ``one_thread_per_shard``), results in order (so bytes stay deterministic)."""
    threads = threads or getattr(_write_threads, "value", None) or WRITE_THREADS
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def marker_path(root: str, shard: int) -> str:
    return join(root, DONE_DIR, f"shard-{shard:05d}.json")


def done_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[int]:
    """Shards with a completion marker, from the listing alone (no marker is read)."""
    done_dir = join(root, DONE_DIR)
    fs.invalidate_cache(done_dir)  # other processes write markers; object-store clients cache listings
    if not fs.exists(done_dir):
        return set()
    names = (posixpath.basename(p) for p in fs.ls(done_dir, detail=False))
    return {int(n[len("shard-"):-len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}


def fresh_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` exists now, not in a cached listing (another process may have written it)."""
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)


def read_markers(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """All per-shard completion markers present: {shard: marker}."""
    done_dir = join(root, DONE_DIR)
    fs.invalidate_cache(done_dir)
    if not fs.exists(done_dir):
        return {}
    markers = {}
    for path in fs.ls(done_dir, detail=False):
        name = posixpath.basename(path)
        if name.startswith("shard-") and name.endswith(".json"):
            marker = read_json(fs, path)
            markers[int(marker["shard"])] = marker
    return markers


# Neighbouring byte ranges are read as one when the gap between them is at most the larger of
# a page (a local disk reads whole pages anyway) and this fraction of the run merged so far:
# fewer requests, at most ~5% more bytes.
MERGE_GAP_BYTES = 4096
MERGE_GAP_FRACTION = 0.05


def coalesce(starts: np.ndarray, ends: np.ndarray, gap_bytes: int = MERGE_GAP_BYTES,
             gap_fraction: float = MERGE_GAP_FRACTION) -> list[tuple[int, int, np.ndarray]]:
    """Byte ranges to read for pieces ``[starts[j], ends[j])`` of one file: (start, end, the
    pieces j inside it, by offset). Pieces are sorted by offset; a piece joins the current range
    when the gap before it is at most ``max(gap_bytes, gap_fraction * (bytes of the range))``."""
    runs: list[list] = []  # [start, end, members]
    for j in np.argsort(starts, kind="stable").tolist():
        start, end = int(starts[j]), int(ends[j])
        run = runs[-1] if runs else None
        if run is not None and start - run[1] <= max(gap_bytes, gap_fraction * (run[1] - run[0])):
            run[1] = max(run[1], end)
            run[2].append(j)
        else:
            runs.append([start, end, [j]])
    return [(first, last, np.asarray(members, dtype=np.int64)) for first, last, members in runs]


class RangeReader:
    """Byte-range reads: ``os.pread`` on a small LRU of open descriptors for local files (an
    fsspec ``cat_file`` costs an open + close per call), ``fs.cat_file`` (a range request)
    elsewhere. Local files are opened with readahead off (``POSIX_FADV_RANDOM``): the reader
    asks for exactly the ranges it needs, and readahead past them would read other views.
    `get_fs` returns the filesystem of the calling process (`CacheReader.fs`)."""

    def __init__(self, get_fs: Callable[[], fsspec.AbstractFileSystem], max_open: int = 64):
        self.get_fs, self.local, self.max_open = get_fs, is_local(get_fs()), max_open
        self._fds: OrderedDict[str, int] = OrderedDict()

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        if not self.local:
            return self.get_fs().cat_file(path, start=start, end=end)  # keywords: s3fs takes version_id second
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        if start is None:
            start, end = 0, os.fstat(fd).st_size
        return os.pread(fd, end - start, start)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
