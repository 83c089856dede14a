"""Create, resume and open target caches: the API stage one and training use.

``create_cache`` makes a new cache or reopens one made by the same configuration (its
``identity``) so that a restarted run skips completed shards; ``open_cache`` reads one.
Each store kind has a format, a write and a read module: ``zarr_format`` / ``zarr_write`` /
``zarr_read`` (default) and ``wds_format`` / ``wds_write`` / ``wds_read``; shared logic in
``writer`` and ``reader``, metadata and identity in ``schema``, filesystems and byte ranges in
``storage``, storage dtypes and their error in ``codecs``.
"""
from __future__ import annotations

from ..errors import UserError
from ..files import write_bytes
from .reader import CacheReader
from .schema import (
    FORMAT_VERSION, META_FILE, CacheCorruptError, CacheMismatchError, check_same_cache, dump_json, normalize_meta,
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
    doc = read_json(fs, join(root, META_FILE))
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"cache {url} has format version {doc.get('format_version')}, this tec-pipeline reads "
                        f"version {FORMAT_VERSION} (views laid out so an epoch reads only its own); rebuild it with "
                        f"`tec-pipeline cache-targets` and the same config plus --overwrite")
    doc["meta"].setdefault("compress", "zstd")  # a meta with no compress key describes zstd chunks
    return doc


def create_cache(url: str, meta: dict, overwrite: bool = False) -> CacheWriter:
    """A writer for the cache at ``url`` (local path or fsspec URL).

    - no cache there: create it (metadata file first, then the store layout);
    - a cache made with the same identity and layout: reopen it, completed shards stay;
    - a different one: ``CacheMismatchError`` naming the first differing key, unless
      ``overwrite`` (then it is deleted and recreated). ``overwrite`` always starts afresh,
      so call it from one process only.
    """
    meta = normalize_meta(meta)
    fs, root = fs_root(url)
    check_bucket(fs, url, root)
    meta_path = join(root, META_FILE)
    with storage_errors(url):
        if fs.exists(meta_path) and not overwrite:
            doc = _read_document(url, fs, root)
            check_same_cache(url, doc["meta"], meta)
            return _WRITERS[meta["store"]](url, fs, root, doc["meta"])
        if fs.exists(root):
            if not overwrite and fs.ls(root, detail=False):
                raise UserError(f"{url} exists and is not a tec-pipeline cache; use --overwrite to replace it")
            fs.rm(root, recursive=True)
        fs.makedirs(root, exist_ok=True)
        write_bytes(fs, meta_path, dump_json(new_document(meta)))
        return _WRITERS[meta["store"]](url, fs, root, meta)


def open_cache(url: str) -> CacheReader:
    """A reader for an existing cache, complete or still being written."""
    fs, root = fs_root(url)
    check_bucket(fs, url, root)
    with storage_errors(url):
        if not fs.exists(join(root, META_FILE)):
            raise UserError(f"{url} is not a tec-pipeline cache (no {META_FILE})")
        doc = _read_document(url, fs, root)
        return _READERS[doc["meta"]["store"]](url, fs, root, doc)
