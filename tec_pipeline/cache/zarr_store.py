"""The zarr v3 store (default): one group, one sharded array per target.

Layout. Arrays are indexed ``[image, view, ...]`` (crop, feat, feat_step, feat_mean,
feat_std, attn, topk_idx) or ``[image]`` (valid, label). Sharding codec: a shard holds
``images_per_shard`` images (all their views), so a cache shard is one file per array and
writers of different shards never share a file. Inside a shard, a chunk is **one view of one
image** (``[1, 1, ...]``), one image for per-image arrays: training reads one view of an image
at a time, and a per-view chunk lets ``read_view`` fetch and decode 1/views of what an
image-sized chunk would cost, for a larger shard index (16 bytes per chunk). Chunks are
``bytes -> zstd(level, checksum)``; the shard index keeps zarr's default crc32c, so a
corrupted chunk or index is detected on read. Every chunk of a written shard is stored (zeros
too), so a missing chunk means damage.

zarr creates the group and the arrays' ``zarr.json`` (``LocalStore`` for paths,
``FsspecStore`` for URLs). Shard files are encoded and written here, in exactly the format
those ``zarr.json`` describe (zstd frame per chunk, then the offset/length index and its
crc32c; zarr reads them back, tested): going through zarr's async codec pipeline cost ~5x
more time per shard on this machine (0.66 s vs 0.12 s for 64 ViT-B views), and writing
the file ourselves makes it one atomic, fsynced file (temporary name + rename).

Reading likewise bypasses zarr's per-call machinery, which costs ~2.5 ms per array per call
and has no shard-index cache (the reader's measured views/s: README "Benchmarks (measured; the
machine is said with each table)", stage two). The format is checked against each
array's ``zarr.json`` when a reader opens: ``read_shard`` reads each array's shard file in one
request and decodes its chunks; ``read_view`` keeps an LRU of shard indexes (offset/length
pairs, crc-checked) and then reads and decodes exactly one chunk per array.

Chunks that lie back to back in a shard file (the writer above stores them in chunk order)
are decoded by **one** zstd call: ``ZSTD_decompress`` decodes concatenated frames, checksums
included, which saves the per-call overhead (~10 us) of thousands of small chunks; a damaged
run is decoded again chunk by chunk to name the bad chunk. ``open_shard`` (training) reads the
same files but keeps ``feat`` and ``attn`` compressed in memory and decodes only the views a
batch takes, straight into the batch, in their stored dtypes: one view per image is used per
epoch, so a shard of V views costs 1/V of a whole-shard decode.
"""
from __future__ import annotations

import json
import mmap
import os
from functools import lru_cache

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from numcodecs.zstd import decompress as zstd_decompress
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError

from ..files import write_bytes
from .schema import (
    IMAGE_ARRAYS, ArraySpec, CacheCorruptError, RangeReader, array_specs, is_local, join, parallel_map, read_json,
)
from .base import TARGET_KEYS, CacheReader, CacheWriter, ShardTargets

MAX_UINT_64 = 2**64 - 1
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
    """Creates the arrays through zarr and writes whole shard files; see the module docstring."""

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
            self._arrays[name] = arr
        self._zstd = Zstd(level=level, checksum=True)  # the frames zarr's ZstdCodec(checksum) makes

    def _shard_files(self, shard: int) -> list[str]:
        return [shard_key(name, len(arr.shape), shard) for name, arr in self._arrays.items()]

    def _clear_shard(self, shard: int) -> None:
        """Remove what a crashed earlier attempt may have left (a rewrite replaces it anyway)."""
        for rel in self._shard_files(shard):
            path = join(self.root, rel)
            for leftover in ([path] if self.fs.exists(path) else []) + self.fs.glob(path + ".tmp-*"):
                self.fs.rm(leftover)

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images) -> dict[str, int]:
        files = {}
        for name, arr in self._arrays.items():
            spec = self.specs[name]
            _, chunk, shard_shape = _layout(spec, self.meta)
            grid = tuple(s // c for s, c in zip(shard_shape, chunk))
            data = encode_shard(enc[name], grid, self._zstd)
            rel = shard_key(name, len(arr.shape), shard)
            write_bytes(self.fs, join(self.root, rel), data)
            files[rel] = len(data)
        return files


def encode_shard(arr: np.ndarray, grid: tuple[int, ...], zstd: Zstd) -> bytes:
    """One zarr v3 shard (sharding_indexed, index at the end) of chunks ``[1, 1, ...]`` / ``[1]``.

    ``arr`` holds the shard's images ``[n, views, ...]`` or ``[n]``; ``grid`` is the chunk
    grid of a full shard (images_per_shard, views, 1, ...). Each chunk is its little-endian
    bytes compressed to one zstd frame (with checksum), as zarr's ``bytes`` + ``zstd`` codecs
    write it; chunks past the array's end (last shard) are absent (offset = length = 2^64-1).
    """
    lead = arr.shape[:2] if len(grid) > 1 else arr.shape[:1]
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    index = np.full((int(np.prod(grid)), 2), MAX_UINT_64, dtype="<u8")
    positions = list(np.ndindex(*lead))
    frames = parallel_map(lambda pos: zstd.encode(arr[pos + (...,)]), positions)
    offset = 0
    for pos, frame in zip(positions, frames):
        index[np.ravel_multi_index(pos, grid[:len(lead)])] = (offset, len(frame))
        offset += len(frame)
    body = index.tobytes()
    return b"".join(frames) + body + np.uint32(google_crc32c.value(body)).tobytes()


@lru_cache(maxsize=1)
def _multi_frame_ok() -> bool:
    """Whether this numcodecs' ``decompress`` decodes concatenated zstd frames in one call
    (it hands them to ``ZSTD_decompress``, which does); checked once on known data, so a
    version that stopped after the first frame falls back to one call per chunk."""
    zstd = Zstd(level=1, checksum=True)
    parts = [np.full(100, 1, np.uint8), np.arange(37, dtype=np.uint8)]
    try:
        out = zstd_decompress(b"".join(zstd.encode(a) for a in parts))
    except Exception:
        return False
    return out == np.concatenate(parts).tobytes()


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
    """Reads shard files directly (one request per array per shard, or per view); see module doc.

    ``index_cache_shards``: shards whose indexes ``read_view`` keeps (each ~16 B per chunk per
    array, ~200 KB for a 256-image x 8-view shard). Random access over more shards than that
    re-reads an index per view: shuffle shards and read them whole instead.
    """

    def __init__(self, url: str, fs, root: str, doc: dict, index_cache_shards: int = 256):
        self._index_cache_shards = index_cache_shards
        self._layouts = {name: _ArrayLayout(name, read_json(fs, join(root, name, "zarr.json")), spec)
                         for name, spec in array_specs(doc["meta"]).items()}
        super().__init__(url, fs, root, doc)

    def _reset_caches(self) -> None:
        self._files = RangeReader(self.fs)
        self._index = lru_cache(maxsize=self._index_cache_shards * len(self._layouts))(self._load_index)
        self._image_tables: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_layouts": self._layouts, "_index_cache_shards": self._index_cache_shards}

    # -- raw access

    def _fail(self, shard: int, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"cache {self.url} shard {shard}: {what}")

    def _file(self, name: str, shard: int) -> tuple[str, int]:
        """(path, recorded size) of an array's shard file."""
        rel = shard_key(name, len(self._layouts[name].shape), shard)
        files = self._marker(shard)["files"]
        if rel not in files:
            raise self._fail(shard, f"no record of file {rel}")
        return join(self.root, rel), int(files[rel])

    def _cat(self, shard: int, name: str, start: int | None = None, end: int | None = None) -> bytes:
        path, size = self._file(name, shard)
        try:
            data = self._files.read(path, start, end)
        except FileNotFoundError:
            raise self._fail(shard, f"file {path} is missing") from None
        if len(data) != (size if start is None else end - start):
            raise self._fail(shard, f"file {path} is truncated ({size} bytes were written)")
        return data

    def _index_array(self, shard: int, name: str, tail: bytes) -> np.ndarray:
        """The shard index, (chunks, 2) uint64 offset/length, crc32c-checked."""
        body, crc = tail[:-4], tail[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            raise self._fail(shard, f"'{name}' shard index fails its crc32c")
        return np.frombuffer(body, dtype="<u8").reshape(-1, 2)

    def _parse_index(self, shard: int, name: str, tail: bytes) -> list[tuple[int, int]]:
        """The shard index (offset, length per chunk), crc32c-checked."""
        return [tuple(e) for e in self._index_array(shard, name, tail).tolist()]

    def _load_index(self, name: str, shard: int) -> list[tuple[int, int]]:
        _, size = self._file(name, shard)
        return self._parse_index(shard, name, self._cat(shard, name, size - self._layouts[name].index_size, size))

    def _entry(self, shard: int, name: str, index: list, chunk: int) -> tuple[int, int]:
        off, length = index[chunk]
        if off == MAX_UINT_64:
            raise self._fail(shard, f"'{name}' chunk {chunk} is missing")
        return off, length

    def _decode_into(self, shard: int, name: str, raw, out: np.ndarray, where: str) -> None:
        """Decompress one chunk straight into ``out`` (contiguous, the chunk's size)."""
        try:
            zstd_decompress(raw, out.reshape(-1).view(np.uint8))
        except Exception as err:  # zstd checksum / size errors
            raise self._fail(shard, f"'{name}' chunk {where} is corrupt ({type(err).__name__}: {err})") from None

    def _whole_file(self, shard: int, name: str) -> memoryview:
        """One array's shard file in one read. Local files are mapped (``mmap``, pre-faulted),
        not copied: zstd then reads the page cache directly, where a fresh several-MB ``bytes``
        per file cost more in page faults than the read itself. Shard files are never modified
        in place (written under a temporary name, then renamed), so a mapping stays valid."""
        if not is_local(self.fs):
            return memoryview(self._cat(shard, name))
        path, size = self._file(name, shard)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    raise self._fail(shard, f"file {path} is truncated ({size} bytes were written)")
                if hasattr(mmap, "MAP_POPULATE"):  # Linux: the page tables in one go
                    mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
                else:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                return memoryview(mapped)
        except FileNotFoundError:
            raise self._fail(shard, f"file {path} is missing") from None

    def _shard_file(self, shard: int, name: str) -> tuple[memoryview, np.ndarray]:
        """One array's shard file (one read) and its checked index."""
        data = self._whole_file(shard, name)
        return data, self._index_array(shard, name, bytes(data[-self._layouts[name].index_size:]))

    def _shard_array(self, shard: int, name: str, file: tuple | None = None) -> np.ndarray:
        """One array's whole shard: one read, then its chunks decoded in place (one zstd call
        when they lie back to back in chunk order, as written; else one call per chunk)."""
        lay = self._layouts[name]
        n = len(self.shard_range(shard))
        data, index = file or self._shard_file(shard, name)
        lead = (n, lay.grid[1]) if lay.per_view else (n,)
        arr = np.empty(lead + lay.chunk[len(lead):], dtype=lay.dtype)
        count = int(np.prod(lead))  # chunk numbers 0..count-1, in the order of arr's leading dims
        off, length = index[:count, 0], index[:count, 1]
        if count and (off != MAX_UINT_64).all() and (off[1:] == off[:-1] + length[:-1]).all() and _multi_frame_ok():
            start, end = int(off[0]), int(off[-1] + length[-1])
            try:
                raw = zstd_decompress(data[start:end])  # sized by the frames' headers: checked below
            except Exception:
                raw = b""  # a damaged chunk: decoded one by one below, which names it
            if len(raw) == arr.nbytes:
                arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
                return arr
        entries = index.tolist()
        for pos in np.ndindex(*lead):
            off, length = self._entry(shard, name, entries, lay.chunk_number(*pos))
            self._decode_into(shard, name, data[off:off + length], arr[pos + (...,)], str(pos))  # a view, even 0-d
        return arr

    # -- reads

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        out = {name: self._shard_array(shard, name) for name in self._layouts}
        self._image_tables[shard] = {name: out[name] for name in IMAGE_ARRAYS}
        return out

    def open_shard(self, shard: int) -> ShardTargets:
        """Training targets of a shard, stored dtypes; ``feat``/``attn`` decoded per view taken."""
        self._marker(shard)
        names = [name for name in TARGET_KEYS if name in self._layouts]
        files = {name: self._shard_file(shard, name) for name in names}
        small = {name: self._shard_array(shard, name, files[name]) for name in names if name not in _ZarrShard.LAZY}
        return _ZarrShard(self, shard, small, {name: files[name] for name in _ZarrShard.LAZY})

    def _image_table(self, shard: int) -> dict[str, np.ndarray]:
        """valid/label of a whole shard, kept for good (9 bytes per image)."""
        if shard not in self._image_tables:
            self._image_tables[shard] = {name: self._shard_array(shard, name) for name in IMAGE_ARRAYS}
        return self._image_tables[shard]

    def _read_view_encoded(self, shard: int, local: int, view: int) -> dict[str, np.ndarray]:
        out = {}
        for name, lay in self._layouts.items():
            if not lay.per_view:
                continue
            off, length = self._entry(shard, name, self._index(name, shard), lay.chunk_number(local, view))
            arr = np.empty(lay.chunk[2:], dtype=lay.dtype)
            self._decode_into(shard, name, self._cat(shard, name, off, off + length), arr, f"({local}, {view})")
            out[name] = arr
        table = self._image_table(shard)
        out["valid"], out["label"] = np.asarray(table["valid"][local]), np.asarray(table["label"][local])
        return out


class _ZarrShard(ShardTargets):
    """``open_shard``'s result: small arrays decoded whole, ``feat`` and ``attn`` kept as their
    compressed shard files and decoded per view into the batch (stored dtypes)."""

    LAZY = ("feat", "attn")

    def __init__(self, reader: ZarrReader, shard: int, small: dict[str, np.ndarray], lazy: dict[str, tuple]):
        super().__init__(small)
        self.reader, self.shard, self.lazy = reader, shard, lazy
        self.views = reader.views

    def fields(self, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        out = super().fields(attn_rows)
        for name in self.lazy:
            chunk = self.reader._layouts[name].chunk[2:]
            rows = min(attn_rows, chunk[0]) if name == "attn" else chunk[0]
            out[name] = (self.reader._layouts[name].dtype, (rows,) + chunk[1:])
        return out

    def take(self, local: np.ndarray, views: np.ndarray, attn_rows: int,
             out: dict[str, np.ndarray] | None = None, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        local, views = np.asarray(local, dtype=np.int64), np.asarray(views, dtype=np.int64)
        if out is None:
            out = {name: np.empty((len(local),) + shape, dtype) for name, (dtype, shape) in self.fields(attn_rows).items()}
            at = np.arange(len(local))
        super().take(local, views, attn_rows, out, at)
        chunks = (local * self.views + views).tolist()
        slots = np.asarray(at).tolist()
        for name, (data, index) in self.lazy.items():
            dest = out[name]
            full = self.reader._layouts[name].chunk[2:]
            entries = index[chunks]
            if (entries[:, 0] == MAX_UINT_64).any():
                chunk = chunks[int(np.flatnonzero(entries[:, 0] == MAX_UINT_64)[0])]
                raise self.reader._fail(self.shard, f"'{name}' chunk {chunk} is missing")
            if dest.shape[1:] == full:  # whole chunks: decoded straight into the batch
                flat = dest.reshape(len(dest), -1).view(np.uint8)
                try:
                    for slot, (off, length) in zip(slots, entries.tolist()):
                        zstd_decompress(data[off:off + length], flat[slot])
                    continue
                except Exception:
                    pass  # a damaged chunk: the careful loop below names it
            scratch = np.empty(full, dtype=dest.dtype)
            for slot, chunk, (off, length) in zip(slots, chunks, entries.tolist()):
                self.reader._decode_into(self.shard, name, data[off:off + length], scratch,
                                         f"({chunk // self.views}, {chunk % self.views})")
                dest[slot] = scratch[:dest.shape[1]]
        return out
