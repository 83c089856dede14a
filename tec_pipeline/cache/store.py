"""Create, resume and open target caches: the API stage one and training use.

``create_cache`` makes a new cache or reopens one made by the same configuration (its
``identity``) so that a restarted run skips completed shards; ``open_cache`` reads one.
Each store kind has a format, a write and a read module: ``zarr_format`` / ``zarr_write`` /
``zarr_read`` (default) and ``wds_format`` / ``wds_write`` / ``wds_read``; shared logic in
``writer`` and ``reader``, metadata and identity in ``schema``, filesystems and byte ranges in
``storage``, storage dtypes and their error in ``codecs``.
"""
from __future__ import annotations

import os

from ..errors import UserError
from ..files import is_local, write_bytes
from ..places import check_cache_place
from .growth import (Growth, GrownReader, check_grown, check_part, grown_parts, growth_of, join_url, recorded_views,
                     with_views)
from .lock import CacheLock
from .owned import damaged_shards, remove_own_files, unproven_files
from .reader import CacheReader
from .schema import (
    FORMAT_VERSION, META_FILE, REQUIRED_META, CacheCorruptError, CacheMismatchError, check_same_cache, dump_json,
    marker_path, normalize_meta, parse_version, with_recorded_parts,
)
from .storage import check_bucket, fs_root, join, read_json, storage_errors
from .wds_read import WdsReader
from .wds_write import WdsWriter
from .zarr_read import ZarrReader
from .writer import CacheWriter, new_document
from .zarr_write import ZarrWriter

__all__ = ["CacheCorruptError", "CacheMismatchError", "CacheReader", "CacheWriter", "create_cache", "open_cache"]

_WRITERS = {"zarr": ZarrWriter, "webdataset": WdsWriter}
_READERS = {"zarr": ZarrReader, "webdataset": WdsReader}


def _read_document(url: str, fs, root: str) -> dict:
    """The cache's metadata file, checked: one line naming it when it is not what cache-targets wrote."""
    path = join(root, META_FILE)
    try:
        doc = read_json(fs, path)
    except (ValueError, UnicodeDecodeError) as err:
        raise _corrupt(url, f"not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise _corrupt(url, "no 'meta' mapping")
    _check_version(url, doc.get("format_version"))
    missing = [k for k in REQUIRED_META if k not in doc["meta"]]
    if missing or doc["meta"]["store"] not in _READERS:
        raise _corrupt(url, f"its meta lacks {missing[0]}" if missing else f"unknown store {doc['meta']['store']!r}")
    doc["meta"].setdefault("compress", "zstd")  # a meta with no compress key describes zstd chunks
    return doc


def _check_version(url: str, recorded) -> None:
    """Read every minor version of this reader's major (a minor only adds what may be ignored);
    refuse a newer major (a later tec-pipeline wrote it) and an older one (it must be rebuilt),
    each in one line naming both versions (docs/format.md, "Versions")."""
    version, ours = parse_version(recorded), parse_version(FORMAT_VERSION)
    if version is None:
        raise _corrupt(url, f"format_version {recorded!r} is not MAJOR.MINOR")
    shown = f"{version[0]}.{version[1]}"
    if version[0] > ours[0]:
        raise UserError(f"cache {url} has format version {shown}, newer than the {FORMAT_VERSION} this tec-pipeline "
                        f"reads: upgrade tec-pipeline to read it")
    if version[0] < ours[0]:
        raise UserError(f"cache {url} has format version {shown}, this tec-pipeline reads version {FORMAT_VERSION} "
                        f"(views laid out so an epoch reads only its own); rebuild it with "
                        f"`tec-pipeline cache-targets` and the same config plus --overwrite")


def _corrupt(url: str, why: str) -> CacheCorruptError:
    return CacheCorruptError(f"cache {url}: {META_FILE} is damaged ({why}); rebuild the cache with "
                             f"`tec-pipeline cache-targets` and the same config plus --overwrite")


def _check_folder(url: str, fs, root: str, found: bool) -> None:
    """Refuse a cache where it would share its folder: a file, a run's folder (or one inside it),
    or a folder of someone else's files."""
    if is_local(fs):
        if os.path.exists(root) and not os.path.isdir(root):
            raise UserError(f"cache.path={url} is a file, not a folder: choose another cache.path")
        check_cache_place(root)
    if not found:
        foreign = unproven_files(fs, root)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise UserError(f"{url} is not a tec-pipeline cache (it holds {foreign[0]}{more}, and no {META_FILE}); "
                            f"choose a new or empty folder for cache.path")


def create_cache(url: str, meta: dict, overwrite: bool = False, owner: bool = False) -> CacheWriter:
    """A writer for the cache at ``url`` (local path or fsspec URL).

    - no cache there: create it (metadata file first, then the store layout);
    - a cache made with the same identity and layout: reopen it, completed shards stay (a pq
      cache's fitted parts too: ``writer.feat_codec``);
    - a different one: ``CacheMismatchError`` naming the first differing key, unless
      ``overwrite`` (then its own files are removed and it is recreated; nothing else in the
      folder is touched). ``overwrite`` always starts afresh.

    ``owner``: this writer is the one process that may change what is there (stage one's rank 0;
    call it before any other process opens the cache). It holds the cache's writing lock
    (`lock.CacheLock`, local caches) until ``close``, and on a reopen it takes every shard whose
    recorded files storage no longer has as written (missing, truncated) as not done
    (``writer.repaired``: {shard: why}), so the run rewrites just those.
    """
    meta = normalize_meta(meta)
    fs, root = fs_root(url)
    check_bucket(fs, url, root)
    meta_path = join(root, META_FILE)
    with storage_errors(url):
        found = fs.exists(meta_path)
        _check_folder(url, fs, root, found)
        lock = CacheLock(url, root) if owner and is_local(fs) else None
        try:
            writer = _reopen(url, fs, root, meta, owner) if found and not overwrite else _create(url, fs, root, meta)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    writer.lock = lock
    return writer


def _reopen(url: str, fs, root: str, meta: dict, repair: bool) -> CacheWriter:
    doc = _read_document(url, fs, root)
    held = with_views(doc["meta"], recorded_views(doc))  # a grown cache holds its parts' views too
    check_same_cache(url, held, with_recorded_parts(meta, held))
    repaired = forget_damaged(fs, root, doc) if repair else {}
    writer = _WRITERS[meta["store"]](url, fs, root, doc["meta"])
    writer.repaired = repaired
    writer.load_feat_codec()  # a pq cache reuses the parts it recorded
    return writer


def _create(url: str, fs, root: str, meta: dict) -> CacheWriter:
    """A fresh cache at root: what was there is either a cache (its metadata proves it), whose own
    files go, or nothing of anyone's but a lock and a half-written metadata file (`_check_folder`)."""
    remove_own_files(fs, root)
    fs.makedirs(root, exist_ok=True)
    write_bytes(fs, join(root, META_FILE), dump_json(new_document(meta)))
    return _WRITERS[meta["store"]](url, fs, root, meta)


def forget_damaged(fs, root: str, doc: dict) -> dict[int, str]:
    """Take every shard whose files no longer match its completion record as not done: its marker
    goes, and a complete cache is marked incomplete again, so a rerun rewrites just those shards.
    Returns {shard: why}."""
    damaged = damaged_shards(fs, root, doc)
    if damaged and doc.get("complete"):
        doc = {**doc, "complete": False,
               "shards": {s: info for s, info in doc["shards"].items() if int(s) not in damaged}}
        write_bytes(fs, join(root, META_FILE), dump_json(doc))
    for shard in damaged:
        if fs.exists(marker_path(root, shard)):
            fs.rm(marker_path(root, shard))
    return damaged


def find_growth(url: str, meta: dict, overwrite: bool = False) -> Growth | None:
    """The views a run of `meta` would add to the complete cache at `url` (`growth.growth_of`);
    None where there is no cache, it is replaced (`overwrite`), or it already holds them."""
    fs, root = fs_root(url)
    check_bucket(fs, url, root)
    with storage_errors(url):
        if overwrite or not fs.exists(join(root, META_FILE)):
            return None
        return growth_of(url, _read_document(url, fs, root), normalize_meta(meta))


def open_cache(url: str) -> CacheReader:
    """A reader for an existing cache, complete or still being written; a grown cache (`growth`)
    is read as one cache of all its views (`GrownReader`)."""
    fs, root = fs_root(url)
    check_bucket(fs, url, root)
    with storage_errors(url):
        if not fs.exists(join(root, META_FILE)):
            raise UserError(f"{url} is not a tec-pipeline cache (no {META_FILE})")
        doc = _read_document(url, fs, root)
        made = _READERS[doc["meta"]["store"]](url, fs, root, doc)
        if not grown_parts(doc):
            return made
        check_grown(url, doc)
        parts = [open_cache(join_url(url, entry["path"])) for entry in grown_parts(doc)]
        for entry, part in zip(grown_parts(doc), parts):
            check_part(url, doc, entry, part)
        return GrownReader([made, *parts])
