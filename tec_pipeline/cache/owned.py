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


BEFORE_METADATA = re.compile(re.escape(LOCK_FILE) + "|" + re.escape(META_FILE) + _TMP)


def unproven_files(fs, root: str) -> list[str]:
    """Files under a root that holds no cache metadata and that no cache-targets run wrote (relative
    paths, sorted): all but the lock and a half-written metadata file, since a cache writes its
    metadata before anything else. Files named like a cache's own (a user's zarr store with arrays
    called ``feat`` or ``attn``) are among them: without the metadata, nothing proves them ours."""
    return sorted(rel for rel in _files(fs, root) if not BEFORE_METADATA.fullmatch(rel))


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
    were written (missing, or another size); the first such file of each shard is named.

    The records are read before the listing: a writer makes a shard's files durable before its
    marker, so a shard recorded by then has its files in the listing, while a shard a running
    cache-targets completes in between is simply not yet recorded (listed first, its files could
    be missing from the listing and its marker present)."""
    recorded = recorded_files(fs, root, doc)
    sizes, damaged = _files(fs, root), {}
    for shard, files in sorted(recorded.items()):
        for rel, size in files.items():
            if rel not in sizes:
                damaged[shard] = f"file {rel} missing"
            elif sizes[rel] != int(size):
                damaged[shard] = f"file {rel} has {sizes[rel]} bytes, {size} were written"
            else:
                continue
            break
    return damaged
