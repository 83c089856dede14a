"""A cache's own files, by name, and what their completion records claim about them.

`--overwrite` removes exactly the files a cache writes (its view parts' too, `growth`): its metadata, the completion markers, the
data of either store (zarr's ``zarr.json`` and shard files, webdataset's tars), a pq cache's
parts (the zarr group ``feat_codec``) and the temporary
names a crashed write leaves beside them. Anything else in the folder (a file the user put there)
is never touched, and a folder holding such files and no cache metadata is not taken as a cache.

A shard's completion record (its marker, folded into ``tec_cache.json`` once the cache is
complete) lists its files and their sizes; `damaged_shards` compares them with storage in one
listing, so a missing or truncated file is found without reading any data.
"""
from __future__ import annotations

import os
import posixpath
import re

from ..files import is_local
from .pq_parts import PART_DIMS, PARTS_GROUP
from .schema import DATA_KEYS, DONE_DIR, META_FILE, read_markers

LOCK_FILE = "tec_cache.lock"  # stage one's writing lock (`cache.lock`): kept, an unlocked file means nothing
_TMP = r"(\.tmp-[0-9a-f]{8})?"  # `files.temporary_name`'s suffix
_ARRAYS = "|".join((*DATA_KEYS, "feat_step"))
_PARTS = "|".join(PART_DIMS)  # a pq cache's fitted parts (`pq_parts`)
_PART = r"(views-\d+-\d+/)?"  # a grown cache's view parts (`growth`) are caches of their own inside it
OWN_FILE = re.compile(_PART + "(" + "|".join([
    r"(?<=/)" + re.escape(LOCK_FILE),  # a view part's lock (the cache's own is kept: its writer holds it)
    re.escape(META_FILE) + _TMP,
    rf"{DONE_DIR}/shard-\d+\.json{_TMP}",
    r"zarr\.json",
    rf"({_ARRAYS})/zarr\.json",
    rf"({_ARRAYS})/c(/\d+)+{_TMP}",
    rf"shard-\d{{5}}-(v\d{{2}}|img)-\d{{3}}\.tar{_TMP}",
    rf"{PARTS_GROUP}/zarr\.json",
    rf"{PARTS_GROUP}/({_PARTS})/(zarr\.json|c(/\d+)+)",
]) + ")")


def _files(fs, root: str) -> dict[str, int]:
    """{path relative to root: size} of every file under root, from one fresh listing."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    prefix = root.rstrip("/") + "/"
    return {path[len(prefix):]: int(info.get("size") or 0) for path, info in found.items()
            if info.get("type") != "directory" and path.startswith(prefix)}


def foreign_files(fs, root: str) -> list[str]:
    """Files under root that no cache writes (relative paths, sorted)."""
    return sorted(rel for rel in _files(fs, root) if rel != LOCK_FILE and not OWN_FILE.fullmatch(rel))


def remove_own_files(fs, root: str) -> None:
    """Remove the cache's own files under root (and, locally, the folders they leave empty);
    everything else stays where it is."""
    own = [posixpath.join(root, rel) for rel in _files(fs, root) if OWN_FILE.fullmatch(rel)]
    if own:
        fs.rm(own)
    if is_local(fs):
        for folder, _, _ in os.walk(root, topdown=False):
            if folder != root and not os.listdir(folder):
                os.rmdir(folder)


def recorded_files(fs, root: str, doc: dict) -> dict[int, dict[str, int]]:
    """{shard: {file: size}} as the completion records claim: the listing of a complete cache's
    metadata, else every marker present."""
    if doc.get("complete"):
        return {int(s): info["files"] for s, info in doc.get("shards", {}).items()}
    return {s: marker["files"] for s, marker in read_markers(fs, root).items()}


def damaged_shards(fs, root: str, doc: dict) -> dict[int, str]:
    """{shard: why} for every shard recorded complete whose files storage no longer has as they
    were written (missing, or another size); the first such file of each shard is named."""
    sizes, damaged = _files(fs, root), {}
    for shard, files in sorted(recorded_files(fs, root, doc).items()):
        for rel, size in files.items():
            if rel not in sizes:
                damaged[shard] = f"file {rel} missing"
            elif sizes[rel] != int(size):
                damaged[shard] = f"file {rel} has {sizes[rel]} bytes, {size} were written"
            else:
                continue
            break
    return damaged
