"""What marks a folder as a target cache or a training run, and the rule that the two never nest.

`cache-targets --overwrite` removes a cache's own files and nothing else, but a run kept inside a
cache (or a cache kept inside a run) shares one tree with it: the next overwrite, clean-up or copy
of the one would take the other along. Both are refused where they are named, before anything is
written. Each is recognised by a file it writes before anything else of its own. A run may not
lie in a folder it reads images from either (`check_apart`): the pictures it writes would join
them. Every relation is taken on resolved paths (`resolved`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import UserError

CACHE_FILE = "tec_cache.json"  # a cache's metadata: written first, before any shard
CHECKPOINT = "checkpoint.pt"  # a run's last training state
IDENTITY_FILE = "identity.json"  # a run's identity: written before its first step
RUN_FILES = (CHECKPOINT, IDENTITY_FILE)


def resolved(path: str | Path) -> Path:
    """`path` as the filesystem reaches it: absolute, every symlink followed, then ``..`` taken
    (a parent of a link is the link target's parent, not the folder the link sits in)."""
    return Path(path).expanduser().resolve()


def _holder(path: str | Path, names: tuple[str, ...]) -> Optional[Path]:
    """`path` itself or the nearest folder above it that holds a file of `names`; None if none does.
    Followed through symlinks (`resolved`): a run reached through a link to a folder in a cache is
    inside that cache."""
    path = resolved(path)
    for folder in (path, *path.parents):
        try:
            if any((folder / name).is_file() for name in names):
                return folder
        except OSError:  # a folder we may not look into holds nothing of ours
            continue
    return None


def _where(path: str | Path, holder: Path, what: str) -> str:
    return f"is {what}" if holder == resolved(path) else f"is inside {what} {holder}"


def check_run_place(output: str | Path) -> None:
    """Refuse a run's output folder that is a cache or lies inside one."""
    cache = _holder(output, (CACHE_FILE,))
    if cache is not None:
        raise UserError(f"output={output} {_where(output, cache, 'the target cache')}; a cache's folder holds only "
                        f"its own files (cache-targets --overwrite replaces them): choose an output outside it")


def check_cache_place(path: str | Path) -> None:
    """Refuse a local cache path that is a training run's folder or lies inside one."""
    run = _holder(path, RUN_FILES)
    if run is not None:
        raise UserError(f"cache.path={path} {_where(path, run, 'the training run')}; keep caches and runs in "
                        f"separate folders: choose a cache.path outside it")


def check_apart(setting: str, path: str | Path, inputs: dict[str, str]) -> None:
    """Refuse `path` (what `setting` names, e.g. a run's output) at or inside a local folder of
    `inputs` ({setting: folder} the command reads images from): an image folder is scanned whole,
    so a picture written there (the monitor's monitor.png) becomes an image of a new class folder,
    and the data a resume or the next run reads has changed (its fingerprint, its classes)."""
    where = resolved(path)
    for key, folder in inputs.items():
        if not folder or "://" in folder or not Path(folder).is_dir():
            continue  # a tar pattern, a URL, or nothing: no folder to scan
        top = resolved(folder)
        if where == top or top in where.parents:
            raise UserError(f"{setting}={path} is inside {key}={folder}, a folder read as images: the pictures it "
                            f"writes would join them; set {setting} to a folder outside it")
