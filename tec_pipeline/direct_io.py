"""Writing a new local file with ``O_DIRECT``: the disk reads the bytes from a page-aligned buffer of
ours, so the kernel never copies them into its page cache.

Why: a buffered ``write`` of a shard file costs the writer thread the kernel's copy of every byte
into the page cache, CPU time in proportion to the bytes written; with ``O_DIRECT`` the device
reads our buffer itself, so the thread spends little CPU for the same disk time, as long as each
write is large (small direct writes are slower: each one waits for the device). The bytes go
through one reused page-aligned staging buffer per thread, ``SEGMENT`` bytes at a time, so memory
stays bounded whatever the file size. ``O_DIRECT`` needs every write aligned: the last segment is
padded with zeros to ``ALIGN`` and the file then cut to its length. Filesystems that refuse
``O_DIRECT`` (EINVAL: some FUSE and network mounts) get a buffered write; ``write_direct`` says
which happened.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

ALIGN = 4096  # a multiple of every logical block size in use (512 or 4096)
SEGMENT = 32 << 20  # bytes per direct write: large enough that the device, not the call, sets the rate
_staging = threading.local()


def staging_buffer() -> memoryview:
    """This thread's page-aligned ``SEGMENT``-byte buffer (an anonymous mmap, made once, reused so
    its pages are faulted in once)."""
    if len(getattr(_staging, "buffer", b"")) != SEGMENT:
        _staging.buffer = mmap.mmap(-1, SEGMENT)
    return memoryview(_staging.buffer)


def segments(buffers: list):
    """The concatenation of `buffers`, as successive fills of the staging buffer: yields the number
    of bytes placed in it each time (``SEGMENT`` but for the last), copying no byte twice."""
    stage, filled = staging_buffer(), 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        while len(view):
            take = min(len(view), SEGMENT - filled)
            stage[filled:filled + take] = view[:take]
            filled, view = filled + take, view[take:]
            if filled == SEGMENT:
                yield filled
                filled = 0
    if filled:
        yield filled


def _write_aligned(fd: int, stage: memoryview, size: int) -> None:
    """Write `size` bytes of `stage`, zero-padded to ``ALIGN``, resuming after a partial write
    (a direct write returns whole blocks)."""
    padded = -(-size // ALIGN) * ALIGN
    stage[size:padded] = bytes(padded - size)
    done = 0
    while done < padded:
        done += os.write(fd, stage[done:padded])


def open_direct(path: str) -> int | None:
    """A new file at `path` opened for direct writes, or None where the filesystem refuses them."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return None
        raise


def write_direct(path: str, buffers: list) -> bool:
    """Write a new file `path`, the concatenation of `buffers`, with ``O_DIRECT`` and fsync it;
    False where the filesystem refuses direct I/O, at the open or at the first write (the caller
    then writes `path` again, buffered). Any other ``OSError`` (full disk, I/O error) propagates;
    the caller removes the partial file."""
    fd = open_direct(path)
    if fd is None:
        return False
    try:
        length, stage = 0, staging_buffer()
        for size in segments(buffers):
            _write_aligned(fd, stage, size)
            length += size
        os.ftruncate(fd, length)  # the padding of the last block goes
        os.fsync(fd)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True
