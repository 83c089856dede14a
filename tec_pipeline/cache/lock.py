"""Stage one's writing lock: one `cache-targets` at a time per cache.

Two runs on one cache (a cluster job submitted twice) would each take the shards they see as
pending and trip over each other's. The writer that creates, repairs or resumes a cache (rank 0
of a launch; the other ranks follow it) holds an exclusive ``fcntl.flock`` on ``tec_cache.lock``
in the cache's folder until it is done. The kernel drops the lock when the process ends, however
it ends, so a killed run never leaves a stale one; the file itself stays, empty, and means nothing
when unlocked. flock holds on local disks and, as POSIX locks, over NFS v4. Object stores have no
lock: there nothing stops a second run, and the completion markers keep the cache correct.
"""
from __future__ import annotations

import fcntl
import os

from ..errors import UserError
from .owned import LOCK_FILE
from .storage import join


class CacheLock:
    """An exclusive, non-blocking lock on a local cache's folder; `release` (or process exit) drops it."""

    def __init__(self, url: str, root: str):
        os.makedirs(root, exist_ok=True)
        path = join(root, LOCK_FILE)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"cache {url} is being written by another cache-targets run (it holds {path}); "
                            f"let it finish, or stop it and rerun") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
