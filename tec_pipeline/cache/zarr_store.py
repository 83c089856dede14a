"""The zarr v3 store (default): one group, one sharded array per target.

Layout. Arrays are indexed ``[image, view, ...]`` (crop, feat, feat_step, feat_mean,
feat_std, attn, topk_idx) or ``[image]`` (valid, label). Sharding codec: a shard holds
``images_per_shard`` images (all their views), so a cache shard is one file per array and
writers of different shards never share a file. Inside a shard, a chunk is **one view of one
image** (``[1, 1, ...]``), one image for per-image arrays: training reads one view of an image
at a time, and a per-view chunk lets ``read_view`` fetch and decode 1/views of what an
image-sized chunk would cost, for a larger shard index (16 bytes per chunk). Chunks are
``bytes -> zstd(level, checksum)``; the shard index keeps zarr's default crc32c, so a
corrupted chunk or index is detected on read.

Writing goes through zarr (``LocalStore`` for paths, ``FsspecStore`` for URLs) with
``write_empty_chunks`` on, so every chunk of a written shard exists and a missing one means
damage, not zeros. A shard is written with one whole-shard assignment per array (writing per
view would rewrite the shard each time).

Reading bypasses zarr's per-call machinery, which costs ~2.5 ms per array per call and has no
shard-index cache (DESIGN "Storage facts"). The shard format is simple and fixed at creation
(checked against each array's ``zarr.json`` when a reader opens): ``read_shard`` reads each
array's shard file in one request and decodes its chunks; ``read_view`` keeps an LRU of shard
indexes (offset/length pairs, crc-checked) and then reads and decodes exactly one chunk per
array. The group stays a plain zarr v3 group that zarr itself reads (tested).
"""
from __future__ import annotations

import json
from functools import lru_cache

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError

from .schema import IMAGE_ARRAYS, ArraySpec, CacheCorruptError, array_specs, fsync_paths, is_local, join, read_json
from .base import CacheReader, CacheWriter

MAX_UINT_64 = 2**64 - 1
_ZSTD = Zstd()
_DIM_NAMES = {
    "crop": ("image", "view", "param"),
    "feat": ("image", "view", "patch", "channel"),
    "feat_step": ("image", "view", "channel"),
    "feat_mean": ("image", "view", "channel"),
    "feat_std": ("image", "view", "channel"),
    "attn": ("image", "view", "query", "head", "patch"),
    "topk_idx": ("image", "view", "rank"),
    "valid": ("image",),
    "label": ("image",),
}


def _zarr_store(writer: CacheWriter):
    """LocalStore for local paths (atomic file writes), FsspecStore for any other URL."""
    if is_local(writer.fs):
        return zarr.storage.LocalStore(writer.root)
    return zarr.storage.FsspecStore.from_url(writer.url)


def _layout(spec: ArraySpec, meta: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, chunk shape, shard shape) of one array."""
    n, v, s = int(meta["num_images"]), int(meta["views"]), int(meta["images_per_shard"])
    if spec.per_view:
        return (n, v) + spec.tail, (1, 1) + spec.tail, (s, v) + spec.tail
    return (n,), (1,), (s,)


def shard_key(name: str, ndim: int, shard: int) -> str:
    """The shard file of an array, relative to the group (zarr's default '/' key encoding)."""
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))


class ZarrWriter(CacheWriter):
    """Writes whole shards through zarr; see the module docstring for the layout."""

    def _init_layout(self) -> None:
        """Create the group and arrays, or open the ones already there (idempotent)."""
        group = zarr.open_group(_zarr_store(self), mode="a", zarr_format=3)
        level = int(self.meta["zstd_level"])
        self._arrays = {}
        for name, spec in self.specs.items():
            shape, chunks, shards = _layout(spec, self.meta)
            try:
                arr = group.create_array(
                    name, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
                    compressors=[ZstdCodec(level=level, checksum=True)], fill_value=0,
                    dimension_names=_DIM_NAMES[name])
            except ContainsArrayError:
                arr = zarr.open_array(group.store_path / name, mode="r+")
            # a runtime setting, not stored: without it all-zero chunks (skipped images,
            # label 0) would be left out and a missing chunk could not be told from damage
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})

    def _shard_files(self, shard: int) -> list[str]:
        return [shard_key(name, len(arr.shape), shard) for name, arr in self._arrays.items()]

    def _clear_shard(self, shard: int) -> None:
        """Remove what a crashed earlier attempt may have left, so a redo writes fresh files."""
        for rel in self._shard_files(shard):
            path = join(self.root, rel)
            if self.fs.exists(path):
                self.fs.rm(path)

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images) -> dict[str, int]:
        rng = self.shard_range(shard)
        for name, arr in self._arrays.items():
            arr[rng.start:rng.stop] = enc[name]  # one whole-shard write per array
        paths = [join(self.root, rel) for rel in self._shard_files(shard)]
        if is_local(self.fs):
            fsync_paths(paths)
        return {rel: int(self.fs.size(path)) for rel, path in zip(self._shard_files(shard), paths)}


class _ArrayLayout:
    """What the reader needs of one array, taken from its ``zarr.json`` and checked."""

    def __init__(self, name: str, zmeta: dict, spec: ArraySpec):
        codecs = zmeta["codecs"]
        ok = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed")
        conf = codecs[0]["configuration"] if ok else {}
        inner = [c["name"] for c in conf.get("codecs", [])]
        index = [c["name"] for c in conf.get("index_codecs", [])]
        enc = zmeta.get("chunk_key_encoding", {})
        if not (ok and inner == ["bytes", "zstd"] and index == ["bytes", "crc32c"]
                and conf.get("index_location") == "end" and enc.get("name") == "default"
                and enc.get("configuration", {}).get("separator") == "/"):
            raise CacheCorruptError(f"array '{name}' has a layout this reader does not know: {json.dumps(codecs)}")
        self.name = name
        self.shape = tuple(zmeta["shape"])
        self.chunk = tuple(conf["chunk_shape"])
        shard_shape = tuple(zmeta["chunk_grid"]["configuration"]["chunk_shape"])
        self.grid = tuple(s // c for s, c in zip(shard_shape, self.chunk))  # chunks per shard
        self.num_chunks = int(np.prod(self.grid))
        self.index_size = 16 * self.num_chunks + 4
        self.dtype = np.dtype(spec.dtype).newbyteorder("<")
        self.per_view = spec.per_view

    def chunk_number(self, local_image: int, view: int = 0) -> int:
        return local_image * self.grid[1] + view if self.per_view else local_image


class ZarrReader(CacheReader):
    """Reads shard files directly (one request per array per shard, or per view); see module doc."""

    def __init__(self, *args, index_cache_shards: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self._layouts = {}
        for name, spec in array_specs(self.meta).items():
            zmeta = read_json(self.fs, join(self.root, name, "zarr.json"))
            self._layouts[name] = _ArrayLayout(name, zmeta, spec)
        # Shard indexes are ~16 B per chunk: 32 KB per array for a 256 x 8-view shard.
        self._index = lru_cache(maxsize=index_cache_shards * len(self._layouts))(self._load_index)
        self._image_tables: dict[int, dict[str, np.ndarray]] = {}

    # -- raw access

    def _file(self, name: str, shard: int) -> tuple[str, int]:
        """(path, recorded size) of an array's shard file."""
        rel = shard_key(name, len(self._layouts[name].shape), shard)
        files = self._marker(shard)["files"]
        if rel not in files:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: no record of file {rel}")
        return join(self.root, rel), int(files[rel])

    def _cat(self, shard: int, name: str, start: int | None = None, end: int | None = None) -> bytes:
        path, size = self._file(name, shard)
        try:
            data = self.fs.cat_file(path, start, end)
        except FileNotFoundError:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: file {path} is missing") from None
        if start is None and len(data) != size:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: file {path} has {len(data)} bytes, "
                                    f"{size} were written")
        return data

    def _parse_index(self, shard: int, name: str, tail: bytes) -> np.ndarray:
        lay = self._layouts[name]
        if len(tail) != lay.index_size:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: '{name}' shard index is truncated")
        body, crc = tail[:-4], tail[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: '{name}' shard index fails its crc32c")
        return np.frombuffer(body, dtype="<u8").reshape(lay.num_chunks, 2)

    def _load_index(self, name: str, shard: int) -> np.ndarray:
        _, size = self._file(name, shard)
        return self._parse_index(shard, name, self._cat(shard, name, size - self._layouts[name].index_size, size))

    def _decode_chunk(self, shard: int, name: str, raw: bytes, where: str) -> np.ndarray:
        lay = self._layouts[name]
        try:
            flat = np.frombuffer(_ZSTD.decode(raw), dtype=lay.dtype)
            return flat.reshape(lay.chunk)
        except Exception as err:  # zstd checksum / size errors
            raise CacheCorruptError(f"cache {self.url} shard {shard}: '{name}' chunk {where} is corrupt "
                                    f"({type(err).__name__}: {err})") from None

    def _entry(self, shard: int, name: str, index: np.ndarray, chunk: int) -> tuple[int, int]:
        off, length = (int(x) for x in index[chunk])
        if off == MAX_UINT_64:
            raise CacheCorruptError(f"cache {self.url} shard {shard}: '{name}' chunk {chunk} is missing")
        return off, length

    # -- reads

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        n = len(self.shard_range(shard))
        out = {}
        for name, lay in self._layouts.items():
            data = self._cat(shard, name)  # the whole shard file in one request
            index = self._parse_index(shard, name, data[-lay.index_size:])
            lead = (n, lay.grid[1]) if lay.per_view else (n,)
            arr = np.empty(lead + lay.chunk[len(lead):], dtype=lay.dtype)
            for pos in np.ndindex(*lead):
                chunk = lay.chunk_number(*pos)
                off, length = self._entry(shard, name, index, chunk)
                arr[pos] = self._decode_chunk(shard, name, data[off:off + length], f"{pos}")[(0,) * len(lead)]
            out[name] = arr
        self._image_tables[shard] = {"valid": out["valid"], "label": out["label"]}
        return out

    def _image_table(self, shard: int) -> dict[str, np.ndarray]:
        """valid/label of a whole shard, kept for good (9 bytes per image)."""
        if shard not in self._image_tables:
            n = len(self.shard_range(shard))
            table = {}
            for name in IMAGE_ARRAYS:
                lay = self._layouts[name]
                data = self._cat(shard, name)
                index = self._parse_index(shard, name, data[-lay.index_size:])
                values = []
                for i in range(n):
                    off, length = self._entry(shard, name, index, i)
                    values.append(self._decode_chunk(shard, name, data[off:off + length], str(i))[0])
                table[name] = np.array(values, dtype=lay.dtype)
            self._image_tables[shard] = table
        return self._image_tables[shard]

    def _read_view_encoded(self, shard: int, local: int, view: int) -> dict[str, np.ndarray]:
        out = {}
        for name, lay in self._layouts.items():
            if not lay.per_view:
                continue
            chunk = lay.chunk_number(local, view)
            off, length = self._entry(shard, name, self._index(name, shard), chunk)
            raw = self._cat(shard, name, off, off + length)
            out[name] = self._decode_chunk(shard, name, raw, f"({local}, {view})")[0, 0]
        table = self._image_table(shard)
        out["valid"], out["label"] = np.asarray(table["valid"][local]), np.asarray(table["label"][local])
        return out
