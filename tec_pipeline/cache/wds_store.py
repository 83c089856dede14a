"""The webdataset store: size-bounded tar shards, one sample per source image, for streaming.

Files: ``shard-{shard:05d}-{part:03d}.tar``; a shard's samples go to part 0 until the next
sample would push it past ``meta["max_part_bytes"]``, then to part 1, and so on. Sample key
= the zero-padded image index; members (webdataset naming ``{key}.{suffix}``):

- ``{key}.{array}.npy.zst`` for feat, feat_step (int8 only), feat_mean, feat_std, attn,
  topk_idx: all views stacked ``[views, ...]`` in the storage dtype (``codecs``), ``.npy``
  bytes compressed by zstd (level from meta, with checksum: a damaged member is detected);
- ``{key}.json``: image index, valid, label, crop params ``[[top, left, height, width, flip]
  per view]`` and the extension of the source image member, if any;
- ``{key}.jpg`` / ``.png`` / ``.webp`` / ``.bin``: the encoded source image (``store_images``).

Tars are built in memory with fixed headers (mtime 0, uid 0, no user names), so the same
data gives the same bytes, then written whole: temporary name + rename on local disks, one
PUT elsewhere (fsspec, so ``memory://`` works).

Streaming: ``tar_urls`` lists the parts for ``webdataset.WebDataset`` and ``decode_sample``
turns one of its samples into the decoded arrays. ``read_view`` indexes a shard's tars once
(member offsets, kept in an LRU) and then reads one sample's byte range.
"""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from functools import lru_cache

import numpy as np
from numcodecs import Zstd

from ..files import write_bytes
from . import codecs
from .base import CacheReader, CacheWriter
from .schema import CacheCorruptError, RangeReader, array_specs, join, parallel_map

_TAR_BLOCK = 512
_JSON_FIELDS = ("valid", "label")


def _key_width(num_images: int) -> int:
    return max(8, len(str(max(num_images - 1, 0))))


def part_name(shard: int, part: int) -> str:
    return f"shard-{shard:05d}-{part:03d}.tar"


def _image_ext(data: bytes) -> str:
    """File extension of an encoded image by its magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _tar_size(members: list[tuple[str, bytes]]) -> int:
    return sum(_TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK for _, data in members)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain ustar archive with fixed headers (deterministic bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def stored_arrays(meta: dict) -> list[str]:
    """Per-view arrays kept as ``.npy.zst`` members (crop goes to the json)."""
    return [n for n, s in array_specs(meta).items() if s.per_view and n != "crop"]


def decode_sample(sample: dict[str, bytes], meta: dict) -> dict[str, np.ndarray]:
    """One webdataset sample (``{suffix: bytes}``, as ``webdataset`` yields it with no
    decoders) -> the decoded arrays of ``CacheReader.read_shard`` for one image ([views, ...])."""
    return codecs.decode(_sample_arrays(sample, meta), meta["feat_dtype"], meta["attn_dtype"])


def _sample_arrays(sample: dict[str, bytes], meta: dict) -> dict[str, np.ndarray]:
    """Encoded arrays of one sample; raises KeyError / ValueError / RuntimeError when damaged."""
    info = json.loads(sample["json"])
    out = {name: np.lib.format.read_array(io.BytesIO(Zstd().decode(sample[f"{name}.npy.zst"])),
                                          allow_pickle=False)
           for name in stored_arrays(meta)}
    out["crop"] = np.asarray(info["crop"], dtype=np.int32).reshape(int(meta["views"]), 5)
    out["valid"] = np.asarray(info["valid"], dtype=np.uint8)
    out["label"] = np.asarray(info["label"], dtype=np.int64)
    return out


class WdsWriter(CacheWriter):
    """Writes each shard as one or more size-bounded tars; see the module docstring."""

    def _init_layout(self) -> None:
        self._zstd = Zstd(level=int(self.meta["zstd_level"]), checksum=True)
        self._width = _key_width(int(self.meta["num_images"]))

    def _clear_shard(self, shard: int) -> None:
        for path in self.fs.glob(join(self.root, f"shard-{shard:05d}-*")):
            self.fs.rm(path)

    def _sample(self, image: int, local: int, enc: dict[str, np.ndarray], images: list | None) -> list:
        """The tar members of one source image."""
        key = f"{image:0{self._width}d}"
        members = [(f"{key}.{name}.npy.zst", self._zstd.encode(_npy_bytes(enc[name][local])))
                   for name in stored_arrays(self.meta)]
        src = images[local] if images is not None else None
        ext = _image_ext(src) if src is not None else None
        info = {"image": image, "valid": int(enc["valid"][local]), "label": int(enc["label"][local]),
                "crop": enc["crop"][local].tolist(), "image_ext": ext}
        members.append((f"{key}.json", json.dumps(info, sort_keys=True).encode()))
        if src is not None:
            members.append((f"{key}.{ext}", bytes(src)))
        return members

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images) -> dict[str, int]:
        limit = int(self.meta["max_part_bytes"])
        files: dict[str, int] = {}
        part: list = []
        size = 0

        def flush() -> None:
            data = _tar_bytes(part)
            rel = part_name(shard, len(files))
            write_bytes(self.fs, join(self.root, rel), data)
            files[rel] = len(data)

        rng = self.shard_range(shard)
        samples = parallel_map(lambda local: self._sample(rng[local], local, enc, images), range(len(rng)))
        for sample in samples:
            sample_size = _tar_size(sample)
            if part and size + sample_size > limit:
                flush()
                part, size = [], 0
            part.extend(sample)
            size += sample_size
        flush()
        return files


class WdsReader(CacheReader):
    """Reads a shard's tars whole (``read_shard``) or one sample by offset (``read_view``)."""

    def __init__(self, url: str, fs, root: str, doc: dict, index_cache_shards: int = 64):
        self._index_cache_shards = index_cache_shards
        super().__init__(url, fs, root, doc)

    def _reset_caches(self) -> None:
        self._index = lru_cache(maxsize=self._index_cache_shards)(self._load_index)
        self._files = RangeReader(self.fs)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_index_cache_shards": self._index_cache_shards}

    def tar_urls(self) -> list[str]:
        """Every tar of the cache (completed shards, in order), as URLs for webdataset."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        return [prefix + join(self.root, rel) for s in sorted(self._markers)
                for rel in sorted(self._marker(s)["files"])]

    def _parts(self, shard: int) -> list[tuple[str, int]]:
        files = self._marker(shard)["files"]
        return [(join(self.root, rel), int(files[rel])) for rel in sorted(files)]

    def _fail(self, shard: int, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"cache {self.url} shard {shard}: {what}")

    def _cat(self, shard: int, path: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return self._files.read(path, start, end)
        except FileNotFoundError:
            raise self._fail(shard, f"file {path} is missing") from None

    def _members(self, shard: int, data: bytes, path: str):
        """(name, offset, size) of each member of one tar held in memory."""
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
        except tarfile.TarError as err:
            raise self._fail(shard, f"{posixpath.basename(path)} is not a valid tar ({err})") from None

    def _samples_of(self, shard: int, entries) -> dict[int, dict[str, tuple]]:
        """Group members by sample key: {image: {suffix: entry}}."""
        samples: dict[int, dict[str, tuple]] = {}
        for entry in entries:
            key, _, suffix = entry[0].partition(".")
            samples.setdefault(int(key), {})[suffix] = entry
        missing = [i for i in self.shard_range(shard) if i not in samples]
        if missing:
            raise self._fail(shard, f"image {missing[0]} has no sample in its tars")
        return samples

    def _decode(self, shard: int, image: int, sample: dict[str, bytes]) -> dict[str, np.ndarray]:
        try:
            return _sample_arrays(sample, self.meta)
        except KeyError as err:
            raise self._fail(shard, f"image {image} lacks member {err}") from None
        except Exception as err:  # zstd checksum, npy header, json
            raise self._fail(shard, f"image {image} has a corrupt member ({type(err).__name__}: {err})") from None

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        entries = []
        for path, size in self._parts(shard):
            data = self._cat(shard, path)
            if len(data) != size:
                raise self._fail(shard, f"{posixpath.basename(path)} has {len(data)} bytes, {size} were written")
            entries += [(name, data[off:off + n]) for name, off, n in self._members(shard, data, path)]
        samples = self._samples_of(shard, entries)
        per_image = [self._decode(shard, i, {s: e[1] for s, e in samples[i].items()})
                     for i in self.shard_range(shard)]
        return {name: np.stack([p[name] for p in per_image]) for name in per_image[0]}

    def _load_index(self, shard: int) -> dict[int, tuple[str, dict[str, tuple[int, int]]]]:
        """{image: (tar path, {suffix: (offset, size)})} of one shard, from its tar headers."""
        entries = []
        for path, size in self._parts(shard):
            try:
                actual = self.fs.size(path)
            except FileNotFoundError:
                raise self._fail(shard, f"file {path} is missing") from None
            if actual != size:
                raise self._fail(shard, f"{posixpath.basename(path)} has {actual} bytes, {size} were written")
            try:
                with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    entries += [(m.name, path, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
            except tarfile.TarError as err:
                raise self._fail(shard, f"{posixpath.basename(path)} is not a valid tar ({err})") from None
        return {image: (next(iter(s.values()))[1], {suffix: (e[2], e[3]) for suffix, e in s.items()})
                for image, s in self._samples_of(shard, entries).items()}

    def _sample_bytes(self, shard: int, image: int) -> dict[str, bytes]:
        """One sample's members, read as one byte range (a sample's members are contiguous)."""
        path, members = self._index(shard)[image]
        start = min(off for off, _ in members.values())
        end = max(off + n for off, n in members.values())
        data = self._cat(shard, path, start, end)
        return {suffix: data[off - start:off - start + n] for suffix, (off, n) in members.items()}

    def _read_view_encoded(self, shard: int, local: int, view: int) -> dict[str, np.ndarray]:
        image = self.shard_range(shard)[local]
        arrays = self._decode(shard, image, self._sample_bytes(shard, image))
        return {name: (a if name in _JSON_FIELDS else a[view]) for name, a in arrays.items()}

    def image_bytes(self, image: int) -> bytes | None:
        """The encoded source image stored with this image's sample, or None."""
        if not self.meta.get("store_images"):
            return None
        shard = image // int(self.meta["images_per_shard"])
        self._marker(shard)
        sample = self._sample_bytes(shard, image)
        ext = json.loads(sample["json"]).get("image_ext")
        return sample[ext] if ext else None
