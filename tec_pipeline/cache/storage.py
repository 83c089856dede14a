"""Where a cache's bytes live: local disks and fsspec URLs (object stores included), their
options and errors, write concurrency, and byte-range reads.
"""
from __future__ import annotations

import json
import os
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np

from ..errors import UserError
from ..files import is_local

# zstd (numcodecs releases the GIL while compressing) runs on a few threads when one shard is
# written alone (``CacheWriter.write_shard`` from a caller's thread); a writer pool's threads
# write one shard each instead (``one_thread_per_shard``).
WRITE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
_write_threads = threading.local()
# Neighbouring byte ranges are read as one when the gap between them is at most the larger of
# a page (a local disk reads whole pages anyway) and this fraction of the run merged so far:
# fewer requests, at most ~5% more bytes.
MERGE_GAP_BYTES = 4096
MERGE_GAP_FRACTION = 0.05


def fs_root(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a local path or fsspec URL; a protocol fsspec cannot serve here
    (unknown, or its package not installed) is one line naming it."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as err:
        protocol = url.split("://", 1)[0]
        raise UserError(f"{url}: storage protocol '{protocol}' is not available here ({err})") from None
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
    if is_local(fs) or fsspec.utils.get_protocol(url) == "memory":  # no buckets there
        return
    if not url.split("://", 1)[-1].strip("/"):
        raise UserError(f"{url}: no bucket named; give the cache a folder inside a bucket, e.g. "
                        f"{url.rstrip('/')}/my_bucket/my_cache.zarr")
    if root.startswith("/"):  # a filesystem of paths, not buckets
        return
    bucket = root.split("/", 1)[0]
    if bucket == root:  # --overwrite replaces the cache's folder: never a whole bucket
        raise UserError(f"{url}: give the cache a folder inside the bucket, e.g. {url.rstrip('/')}/my_cache.zarr")
    with storage_errors(url):
        if fs.exists(bucket):
            return
        try:  # exists() says False for any failure: a listing tells a missing bucket from unreachable storage
            fs.ls(bucket, detail=False)
            return
        except FileNotFoundError:
            pass
    raise UserError(f"{url}: bucket '{bucket}' does not exist (create it, or check cache.storage_options)")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Storage that refuses us (no credentials, access denied, unreachable endpoint) as one line
    naming the URL, instead of a client library's traceback."""
    try:
        yield
    except PermissionError as err:
        if fsspec.utils.get_protocol(url) == "file":
            raise UserError(f"cache {url}: permission denied on {err.filename or url}") from None
        raise UserError(f"{url}: access denied ({err}); check the credentials or cache.storage_options") from None
    except (ConnectionError, TimeoutError) as err:
        raise UserError(f"{url}: storage not reachable ({err})") from None
    except Exception as err:  # botocore's credential and endpoint errors share no stdlib base class
        if type(err).__module__.split(".")[0] not in ("botocore", "aiobotocore"):
            raise
        if "Connect" in type(err).__name__:  # EndpointConnectionError, ConnectTimeoutError, ...
            raise UserError(f"{url}: storage not reachable ({err}); check the endpoint in cache.storage_options "
                            f"or the environment") from None
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


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def fresh_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` exists now, not in a cached listing (another process may have written it)."""
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)


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
