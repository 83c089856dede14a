"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_paths(paths: list[str]) -> None:
    """Make local files and their directories durable (data first, then the names)."""
    for path in [*paths, *sorted({os.path.dirname(os.path.abspath(p)) for p in paths})]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; once the block has written it, fsync it, rename it
    onto `path` and fsync the directory. If the block fails, `path` is untouched and the
    temporary file removed. The temporary name is unique, so writers of different files in one
    directory (several processes) never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")  # a crash leftover: `name.tmp-*`
    try:
        yield tmp
        fsync_paths([str(tmp)])
        os.replace(tmp, path)
        fsync_paths([str(path)])
    finally:
        tmp.unlink(missing_ok=True)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's own disk (protocol ``file``), where files
    are written through `atomic_path` and read with ``os.pread``."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file on a local or fsspec filesystem so that readers see nothing or all of it.

    Local: `atomic_path`. Elsewhere one ``pipe_file``: an object-store PUT is atomic (a "rename"
    there is a copy), and so is a write to ``memory://``.
    """
    if is_local(fs):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        fs.pipe_file(path, data)


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
