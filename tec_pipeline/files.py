"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.
A write that fails (full disk, I/O error) raises `StorageError`, one line naming the file, what it
holds and the free space; the previous version of the file stays as it was."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .direct_io import write_direct
from .errors import StorageError

IOV_MAX = 1024  # buffers per writev call (Linux's limit; POSIX guarantees at least 16)


def free_space(path: str | Path) -> str:
    """Free space on the filesystem holding `path` (its nearest existing folder), for messages."""
    folder = Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return "unknown"


def storage_error(path: str | Path, what: str, err: OSError) -> StorageError:
    """The one-line error of a failed write of `what` to `path`."""
    reason = err.strerror or str(err) or type(err).__name__
    return StorageError(f"cannot write {what} {path}: {reason} ({free_space(path)} free there)")


def temporary_name(path: str | Path) -> str:
    """A unique name beside `path` to write it under before the rename (a crash leftover:
    `name.tmp-*`), so writers of different files in one directory never share one."""
    return f"{path}.tmp-{uuid.uuid4().hex[:8]}"


def folders_of(paths) -> list[str]:
    """The directories holding `paths`, sorted, each once."""
    return sorted({os.path.dirname(os.path.abspath(p)) for p in paths})


def fsync_paths(paths: list[str], dirs: list[str] | None = None) -> None:
    """Make local files and their directories (default: the files' own) durable, data first,
    then the names."""
    dirs = folders_of(paths) if dirs is None else dirs
    for path in [*paths, *dirs]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path, what: str = "the file") -> Iterator[Path]:
    """Yield a temporary name beside `path`; once the block has written it, fsync it, rename it
    onto `path` and fsync the directory. If the block fails, `path` is untouched and the
    temporary file removed; an `OSError` (full disk, I/O error) becomes `StorageError` naming
    `what`. The temporary name is unique, so writers of different files in one directory
    (several processes) never share one."""
    path = Path(path)
    tmp = Path(temporary_name(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_paths([str(tmp)])
        os.replace(tmp, path)
        fsync_paths([str(path)])
    except OSError as err:
        raise storage_error(path, what, err) from None
    finally:
        with suppress(OSError):  # a failed clean-up (no folder, a read-only one) must not hide why the write failed
            tmp.unlink(missing_ok=True)


def _write_all(fd: int, buffers: list) -> None:
    """Write `buffers` back to back at `fd`'s position with ``os.writev`` (no joined copy), at
    most IOV_MAX of them per call, resuming after a partial write."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def write_files_durably(files: dict[str, list], what: str = "the cache file", direct: bool = False) -> None:
    """Write several local files, each the concatenation of its buffers, so that each appears
    whole or not at all: every file under a temporary name (``os.writev``, or with `direct`
    ``direct_io.write_direct`` where the filesystem allows it), one fsync each, then every rename,
    then one fsync per directory. The same guarantee as `atomic_path` per file, for half the
    fsyncs; an `OSError` becomes `StorageError` naming the file and `what`, and no temporary file
    is left."""
    tmps = {path: temporary_name(path) for path in files}
    current = next(iter(files), "")
    try:
        for path, buffers in files.items():
            current = path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if direct and write_direct(tmps[path], buffers):
                continue
            fd = os.open(tmps[path], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, buffers)
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in files:
            current = path
            os.replace(tmps[path], path)
        fsync_paths([], dirs=folders_of(files))
    except OSError as err:
        raise storage_error(current, what, err) from None
    finally:
        for tmp in tmps.values():
            with suppress(OSError):  # as in `atomic_path`: the write's own error is the one to report
                os.unlink(tmp)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's own disk (protocol ``file``), where files
    are written through `atomic_path` and read with ``os.pread``."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols


def write_bytes(fs, path: str, data: bytes, what: str = "the cache file") -> None:
    """Write a whole file on a local or fsspec filesystem so that readers see nothing or all of it.

    Local: `atomic_path`. Elsewhere one ``pipe_file``: an object-store PUT is atomic (a "rename"
    there is a copy), and so is a write to ``memory://``.
    """
    if is_local(fs):
        with atomic_path(path, what) as tmp:
            tmp.write_bytes(data)
        return
    try:
        fs.pipe_file(path, data)
    except OSError as err:
        raise StorageError(f"cannot write {what} {path}: {err.strerror or err}") from None


def write_json(path: str | Path, obj: Any, what: str = "the file") -> None:
    """`obj` as indented JSON, atomically."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_line(path: str | Path, line: str, what: str = "the log") -> None:
    """Append one line to a text file (a log: a lost last line is harmless, a traceback is not)."""
    try:
        with Path(path).open("a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise storage_error(path, what, err) from None
