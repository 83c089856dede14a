"""The webdataset store: size-bounded tar shards grouped by view index, for streaming.

Files of shard s: ``shard-{s:05d}-v{view:02d}-{part:03d}.tar``, one group of parts per view
index, and ``shard-{s:05d}-img-{part:03d}.tar`` with the encoded source images
(``store_images``), stored once, apart from the targets. An epoch uses one view per image, so
streaming it reads one view group of every shard (``tar_urls(view)``): about 1/V of the cache.
Samples go to part 0 until the next would push it past ``meta["max_part_bytes"]``, then to
part 1, and so on. Sample key = the zero-padded image index; members (webdataset naming
``{key}.{suffix}``):

- view tars: ``{key}.{array}.npy.zst`` for feat, feat_step (int8 only), feat_mean, feat_std,
  attn, topk_idx of that one view in the storage dtype (``codecs``), ``.npy`` bytes compressed
  by zstd (level from meta, with checksum: a damaged member is detected), and ``{key}.json``:
  image index, view, valid, label and the view's crop ``[top, left, height, width, flip]``;
- image tars: ``{key}.jpg`` / ``.png`` / ``.webp`` / ``.bin``.

Tars are built in memory with fixed headers (mtime 0, uid 0, no user names), so the same data
gives the same bytes, then written whole: temporary name + rename on local disks, one PUT
elsewhere (fsspec). Each shard's completion marker lists, per tar, where each sample's bytes
lie (``samples``: image, start, end), so a reader fetches exactly the samples it needs with
range requests, neighbours coalesced, and never walks tar headers over the network.
"""
from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache

import numpy as np
from numcodecs import Zstd

from ..files import write_bytes
from . import codecs
from .reader import CacheReader, ShardTargets, target_fields
from .schema import array_specs, marker_path
from .storage import coalesce, join, parallel_map, read_json
from .writer import CacheWriter

_TAR_BLOCK = 512
IMAGES = "img"


def _key_width(num_images: int) -> int:
    return max(8, len(str(max(num_images - 1, 0))))


def group_name(view: int | None) -> str:
    """The file-name group of one view's tars, or of the source images (None)."""
    return IMAGES if view is None else f"v{view:02d}"


def part_name(shard: int, group: str, part: int) -> str:
    return f"shard-{shard:05d}-{group}-{part:03d}.tar"


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
    """Bytes of members in a ustar archive: one 512-byte header each, data padded to 512."""
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


def tar_members(data: bytes | memoryview) -> dict[str, bytes]:
    """{suffix: bytes} of the members in one sample's span (whole 512-byte header blocks, each
    followed by its padded data), as `_tar_bytes` lays them out."""
    out, pos = {}, 0
    while pos + _TAR_BLOCK <= len(data):
        info = tarfile.TarInfo.frombuf(bytes(data[pos:pos + _TAR_BLOCK]), tarfile.ENCODING, "surrogateescape")
        start = pos + _TAR_BLOCK
        out[info.name.partition(".")[2]] = bytes(data[start:start + info.size])
        pos = start + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
    return out


def stored_arrays(meta: dict) -> list[str]:
    """Per-view arrays kept as ``.npy.zst`` members (crop goes to the json)."""
    return [n for n, s in array_specs(meta).items() if s.per_view and n != "crop"]


def decode_sample(sample: dict[str, bytes], meta: dict) -> dict[str, np.ndarray]:
    """One view-tar sample (``{suffix: bytes}``, as ``webdataset`` yields it with no decoders)
    -> the decoded arrays of ``CacheReader.read_view`` for that image and view."""
    return codecs.decode(_sample_arrays(sample, meta), meta["feat_dtype"], meta["attn_dtype"])


def _sample_arrays(sample: dict[str, bytes], meta: dict) -> dict[str, np.ndarray]:
    """Encoded arrays of one view of one image; raises KeyError / ValueError / RuntimeError when damaged."""
    info = json.loads(sample["json"])
    out = {name: np.lib.format.read_array(io.BytesIO(Zstd().decode(sample[f"{name}.npy.zst"])),
                                          allow_pickle=False)
           for name in stored_arrays(meta)}
    out["crop"] = np.asarray(info["crop"], dtype=np.int32)
    out["valid"] = np.asarray(info["valid"], dtype=np.uint8)
    out["label"] = np.asarray(info["label"], dtype=np.int64)
    return out


class WdsWriter(CacheWriter):
    """Writes each shard as size-bounded tars, one group per view; see the module docstring."""

    def _init_layout(self) -> None:
        self._zstd = Zstd(level=int(self.meta["zstd_level"]), checksum=True)
        self._width = _key_width(int(self.meta["num_images"]))
        self._spans: dict[int, dict[str, list[int]]] = {}

    def _clear_shard(self, shard: int) -> None:
        for path in self.fs.glob(join(self.root, f"shard-{shard:05d}-*")):
            self.fs.rm(path)

    def _view_sample(self, image: int, local: int, view: int, enc: dict[str, np.ndarray]) -> list:
        """The tar members of one view of one source image."""
        key = f"{image:0{self._width}d}"
        members = [(f"{key}.{name}.npy.zst", self._zstd.encode(_npy_bytes(enc[name][local, view])))
                   for name in stored_arrays(self.meta)]
        info = {"image": image, "view": view, "valid": int(enc["valid"][local]), "label": int(enc["label"][local]),
                "crop": enc["crop"][local, view].tolist()}
        return members + [(f"{key}.json", json.dumps(info, sort_keys=True).encode())]

    def _write_group(self, shard: int, group: str, samples: list[tuple[int, list]]) -> dict[str, int]:
        """Write (image, members) samples as size-bounded parts; record each sample's byte span."""
        limit, files, parts = int(self.meta["max_part_bytes"]), {}, [[]]
        for image, members in samples:
            if parts[-1] and sum(_tar_size(m) for _, m in parts[-1]) + _tar_size(members) > limit:
                parts.append([])
            parts[-1].append((image, members))
        for number, part in enumerate(parts):
            rel, offset, spans = part_name(shard, group, number), 0, []
            for image, members in part:
                spans += [image, offset, offset + _tar_size(members)]
                offset += _tar_size(members)
            data = _tar_bytes([m for _, members in part for m in members])
            write_bytes(self.fs, join(self.root, rel), data)
            files[rel], self._spans[shard][rel] = len(data), spans
        return files

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images) -> dict[str, int]:
        rng, files = self.shard_range(shard), {}
        self._spans[shard] = {}
        for view in range(int(self.meta["views"])):
            samples = parallel_map(lambda local: self._view_sample(rng[local], local, view, enc), range(len(rng)))
            files.update(self._write_group(shard, group_name(view), list(zip(rng, samples))))
        if images is not None:
            key = f"{{:0{self._width}d}}"
            stored = [(i, [(f"{key.format(i)}.{_image_ext(src)}", bytes(src))]) for i, src in zip(rng, images)
                      if src is not None]
            files.update(self._write_group(shard, IMAGES, stored))
        return files

    def _marker_fields(self, shard: int) -> dict:
        return {"samples": self._spans.pop(shard, {})}


class WdsReader(CacheReader):
    """Reads a shard's tars whole (``read_shard``) or samples by byte range (``read_view``,
    ``open_shard``, ``image_bytes``), from the sample spans in the shard's completion marker."""

    def __init__(self, url: str, fs, root: str, doc: dict, index_cache_shards: int = 64):
        self._index_cache_shards = index_cache_shards
        super().__init__(url, fs, root, doc)

    def _reset_caches(self) -> None:
        self._index = lru_cache(maxsize=self._index_cache_shards)(self._load_index)
        super()._reset_caches()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_index_cache_shards": self._index_cache_shards}

    def tar_urls(self, view: int | None = None) -> list[str]:
        """The view tars of the cache (completed shards, in order), all or those of one `view`
        (what streaming one epoch reads), as URLs for webdataset."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        groups = [group_name(v) for v in (range(self.views) if view is None else [view])]
        return [prefix + join(self.root, rel) for s in sorted(self._markers)
                for rel in sorted(self._marker(s)["files"]) if rel.split("-")[2] in groups]

    def _load_index(self, shard: int) -> dict[tuple[int, str], tuple[str, int, int]]:
        """{(image, group): (tar, start, end)} of one shard, from its completion marker."""
        marker = self._markers.get(shard)
        if not (marker and "samples" in marker):
            marker = read_json(self.fs, marker_path(self.root, shard))
        out = {}
        for rel, spans in marker["samples"].items():
            group = rel.split("-")[2]
            for image, start, end in np.asarray(spans, dtype=np.int64).reshape(-1, 3).tolist():
                out[(image, group)] = (rel, start, end)
        return out

    def _span(self, shard: int, image: int, group: str) -> tuple[str, int, int]:
        self._marker(shard)
        found = self._index(shard).get((image, group))
        if found is None:
            raise self._fail(shard, f"image {image} has no sample in its {group} tars")
        return found

    def _decode(self, shard: int, image: int, sample: dict[str, bytes]) -> dict[str, np.ndarray]:
        try:
            return _sample_arrays(sample, self.meta)
        except KeyError as err:
            raise self._fail(shard, f"image {image} lacks member {err}") from None
        except Exception as err:  # zstd checksum, npy header, json
            raise self._fail(shard, f"image {image} has a corrupt member ({type(err).__name__}: {err})") from None

    def _read_samples(self, shard: int, pairs: list[tuple[int, str]]) -> dict[tuple[int, str], dict[str, bytes]]:
        """The members of (image, group) samples, one coalesced range request per run of them."""
        spans = [self._span(shard, image, group) for image, group in pairs]
        out = {}
        for rel in sorted({s[0] for s in spans}):
            mine = [j for j, s in enumerate(spans) if s[0] == rel]
            starts = np.asarray([spans[j][1] for j in mine]), np.asarray([spans[j][2] for j in mine])
            for first, last, members in coalesce(*starts):
                data = memoryview(self._read_file(shard, rel, first, last))
                for m in members.tolist():
                    _, start, end = spans[mine[m]]
                    out[pairs[mine[m]]] = tar_members(data[start - first:end - first])
        return out

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        rng = self.shard_range(shard)
        pairs = [(i, group_name(v)) for i in rng for v in range(self.views)]
        samples = self._read_samples(shard, pairs)
        views = [[self._decode(shard, i, samples[(i, group_name(v))]) for v in range(self.views)] for i in rng]
        out = {name: np.stack([np.stack([v[name] for v in image]) for image in views]) for name in views[0][0]}
        out["valid"], out["label"] = out["valid"][:, 0], out["label"][:, 0]
        return out

    def _read_view_encoded(self, shard: int, local: int, view: int) -> dict[str, np.ndarray]:
        image = self.shard_range(shard)[local]
        return self._decode(shard, image, self._read_samples(shard, [(image, group_name(view))])[(image, group_name(view))])

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        start = self.shard_range(shard).start
        spans = [self._span(shard, start + int(i), group_name(int(v))) for i, v in zip(local, views)]
        return sum(end - begin for _, begin, end in spans)

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardTargets:
        """Training targets of the views taken (``wanted`` read at once, coalesced), stored dtypes."""
        self._marker(shard)
        return _WdsShard(self, shard, wanted)

    def image_bytes(self, image: int) -> bytes | None:
        """The encoded source image stored in the shard's image tars, or None."""
        if not self.meta.get("store_images"):
            return None
        shard = image // int(self.meta["images_per_shard"])
        self._marker(shard)
        if (image, IMAGES) not in self._index(shard):  # an image that could not be read when cached
            return None
        return next(iter(self._read_samples(shard, [(image, IMAGES)])[(image, IMAGES)].values()))


class _WdsShard(ShardTargets):
    """``open_shard``'s result: the samples fetched and not yet taken, decoded into the batch
    when taken (each view is taken once per epoch, so its bytes are dropped then)."""

    def __init__(self, reader: WdsReader, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None):
        super().__init__({})
        self.reader, self.shard, self.start = reader, shard, reader.shard_range(shard).start
        self.raw: dict[tuple[int, str], dict[str, bytes]] = {}
        if wanted is not None:
            self.fetch(np.asarray(wanted[0]), np.asarray(wanted[1]))

    def fetch(self, local: np.ndarray, views: np.ndarray) -> None:
        pairs = [(self.start + int(i), group_name(int(v))) for i, v in zip(local, views)]
        missing = list(dict.fromkeys(p for p in pairs if p not in self.raw))
        if missing:
            self.raw.update(self.reader._read_samples(self.shard, missing))

    def fields(self, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return target_fields(self.reader.meta, attn_rows)

    def take(self, local: np.ndarray, views: np.ndarray, attn_rows: int,
             out: dict[str, np.ndarray] | None = None, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        self.fetch(local, views)
        pairs = [(self.start + int(i), group_name(int(v))) for i, v in zip(local, views)]
        arrays = [self.reader._decode(self.shard, image, self.raw.pop((image, group))) for image, group in pairs]
        stacked = ShardTargets({name: np.stack([a[name] for a in arrays])[:, None] for name in arrays[0]})
        zeros = np.zeros(len(pairs), dtype=np.int64)
        return stacked.take(np.arange(len(pairs)), zeros, attn_rows, out, at)
