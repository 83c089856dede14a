"""The source images a cache's views are re-rendered from: stored in the cache, or the image set
it was made from, checked to be that set."""
from __future__ import annotations

from PIL import Image

from ..cache.schema import CacheMismatchError
from ..data import open_source_at
from ..data.sources import BadImageError, ImageSource, decode_rgb
from .interfaces import TargetReader


class CacheImageSource:
    """Source images stored inside the cache (webdataset with `store_images`)."""

    def __init__(self, reader: TargetReader):
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_images

    def name(self, index: int) -> str:
        return f"cache image {index}"

    def raw(self, index: int) -> bytes:
        data = self.reader.image_bytes(index)
        if data is None:
            raise BadImageError(f"{self.name(index)}: not stored in the cache")
        return data

    def load(self, index: int) -> Image.Image:
        return decode_rgb(self.raw(index), self.name(index))


def cache_image_source(reader: TargetReader, data_path: str = "") -> ImageSource:
    """The images a cache was made from: stored in it, `data.path` if given, else the recorded source path.

    The recorded image count (and fingerprint, when the metadata has one) must match.
    """
    if reader.meta.get("store_images"):
        return CacheImageSource(reader)
    recorded = reader.meta.get("source", {}) or {}
    path = data_path or recorded.get("path") or ""
    if not path:
        raise CacheMismatchError("data.path is empty and the cache records no source image path")
    source = open_source_at(recorded.get("kind", "imagefolder"), path)
    if len(source) != reader.num_images:
        raise CacheMismatchError(f"data.path={path} holds {len(source)} images, the cache was made from {reader.num_images}")
    fingerprint = recorded.get("fingerprint")
    if fingerprint and source.fingerprint() != fingerprint:
        raise CacheMismatchError(f"data.path={path} is not the image set the cache was made from (file list differs)")
    return source
