"""Target cache: schema + metadata, zarr v3 store (default), webdataset store, readers.

The API lives in ``store``: ``create_cache`` / ``CacheWriter`` for stage one,
``open_cache`` / ``CacheReader`` for training; ``inspect.describe_cache`` for the CLI.
"""
from .store import CacheCorruptError, CacheMismatchError, CacheReader, CacheWriter, create_cache, open_cache

__all__ = ["CacheCorruptError", "CacheMismatchError", "CacheReader", "CacheWriter", "create_cache", "open_cache"]
