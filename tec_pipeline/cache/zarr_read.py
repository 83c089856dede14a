"""Reading the zarr store (`zarr_format` describes the layout): shard files read directly.

Reading bypasses zarr's per-call machinery, which re-resolves each array and keeps no cache of
shard indexes between calls. The format is checked against each array's ``zarr.json`` when a
reader opens: ``read_shard`` reads each array's shard file in one request and decodes its chunks;
``read_view`` keeps an LRU of shard indexes (offset/length pairs, crc-checked) and then reads and
decodes exactly one chunk per array.

Inside each shard file the chunks lie **view-major**: every image's view 0, then every image's
view 1, and so on (the index says where each (image, view) chunk is, so zarr reads the file the
same). An epoch of training takes one view per image, so in ``cycle`` mode its chunks of one
shard and array are one contiguous byte range: ``open_shard`` reads each array's index (the
file's last 16 bytes per chunk) and then only the chunks it is told it will take (``wanted``:
one loader worker's share of the epoch), neighbours coalesced (`storage.coalesce`), by
``pread`` locally or range requests through fsspec; ``take`` decodes them straight into the
batch in their stored dtypes. A whole-shard read decodes chunks lying back to back with **one**
zstd call (``ZSTD_decompress`` decodes concatenated frames, checksums included), which saves
the per-call overhead of thousands of small chunks; a damaged run is decoded again
chunk by chunk to name the bad chunk.
"""
from __future__ import annotations

import json
import mmap
import os
from functools import lru_cache

import google_crc32c
import numpy as np
from numcodecs import Zstd
from numcodecs.zstd import decompress as zstd_decompress

from ..files import is_local
from .reader import TARGET_KEYS, CacheReader, ShardBuffer, target_fields
from .chunk_codec import ZARR_NAMES, ChunkCodec
from .schema import IMAGE_ARRAYS, ArraySpec, CacheCorruptError, array_specs
from .storage import coalesce, join, read_json
from .zarr_format import MAX_UINT_64, shard_key


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

    def __init__(self, name: str, zmeta: dict, spec: ArraySpec, meta: dict):
        codecs = zmeta["codecs"]
        ok = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed")
        conf = codecs[0]["configuration"] if ok else {}
        inner = [c["name"] for c in conf.get("codecs", [])]
        index = [c["name"] for c in conf.get("index_codecs", [])]
        enc = zmeta.get("chunk_key_encoding", {})
        if not (ok and inner == ZARR_NAMES[meta["compress"]] and index == ["bytes", "crc32c"]
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
        self.codec = ChunkCodec(meta["compress"], int(meta["zstd_level"]), self.dtype)

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
        self._layouts = {name: _ArrayLayout(name, read_json(fs, join(root, name, "zarr.json")), spec, doc["meta"])
                         for name, spec in array_specs(doc["meta"]).items()}
        super().__init__(url, fs, root, doc)

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._index = lru_cache(maxsize=self._index_cache_shards * len(self._layouts))(self._load_index)
        self._image_tables: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_layouts": self._layouts, "_index_cache_shards": self._index_cache_shards}

    # -- raw access

    def _rel(self, name: str, shard: int) -> str:
        """An array's shard file, relative to the cache root."""
        return shard_key(name, len(self._layouts[name].shape), shard)

    def _file(self, name: str, shard: int) -> tuple[str, int]:
        """(path, recorded size) of an array's shard file."""
        return self._recorded_file(shard, self._rel(name, shard))

    def _cat(self, shard: int, name: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._read_file(shard, self._rel(name, shard), start, end)

    def _index_array(self, shard: int, name: str, tail: bytes) -> np.ndarray:
        """The shard index, (chunks, 2) uint64 offset/length, crc32c-checked."""
        body, crc = tail[:-4], tail[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            raise self._fail(shard, f"'{name}' shard index fails its crc32c")
        return np.frombuffer(body, dtype="<u8").reshape(-1, 2)

    def _load_index(self, name: str, shard: int) -> np.ndarray:
        """An array's shard index (chunks, 2) offset/length, read alone: the file's last bytes."""
        _, size = self._file(name, shard)
        return self._index_array(shard, name, self._cat(shard, name, size - self._layouts[name].index_size, size))

    def _entry(self, shard: int, name: str, index: np.ndarray, chunk: int) -> tuple[int, int]:
        off, length = (int(x) for x in index[chunk])
        if off == MAX_UINT_64:
            raise self._fail(shard, f"'{name}' chunk {chunk} is missing")
        return off, length

    def _decode_into(self, shard: int, name: str, raw, out: np.ndarray, where: str) -> None:
        """Decode one chunk straight into ``out`` (contiguous, the chunk's size)."""
        try:
            self._layouts[name].codec.decode_into(raw, out)
        except Exception as err:  # checksum / size errors
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
        """One array's whole shard: one read, then its chunks decoded in place (zstd: one call
        when they lie back to back, as written; else one call per chunk)."""
        lay = self._layouts[name]
        n = len(self.shard_range(shard))
        data, index = file or self._shard_file(shard, name)
        lead = (n, lay.grid[1]) if lay.per_view else (n,)
        arr = np.empty(lead + lay.chunk[len(lead):], dtype=lay.dtype)
        count = int(np.prod(lead))  # chunk numbers 0..count-1, in the order of arr's leading dims
        order = np.argsort(index[:count, 0], kind="stable")  # chunk numbers in file order
        off, length = index[order, 0], index[order, 1]
        if (count and lay.codec.concatenates and (off != MAX_UINT_64).all()
                and (off[1:] == off[:-1] + length[:-1]).all() and _multi_frame_ok()):
            start, end = int(off[0]), int(off[-1] + length[-1])
            try:
                raw = zstd_decompress(data[start:end])  # sized by the frames' headers: checked below
            except Exception:
                raw = b""  # a damaged chunk: decoded one by one below, which names it
            if len(raw) == arr.nbytes:
                arr.reshape(count, -1).view(np.uint8)[order] = np.frombuffer(raw, np.uint8).reshape(count, -1)
                return arr
        for pos in np.ndindex(*lead):
            off, length = self._entry(shard, name, index, lay.chunk_number(*pos))
            self._decode_into(shard, name, data[off:off + length], arr[pos + (...,)], str(pos))  # a view, even 0-d
        return arr

    # -- reads

    def _read_encoded(self, shard: int) -> dict[str, np.ndarray]:
        out = {name: self._shard_array(shard, name) for name in self._layouts}
        self._image_tables[shard] = {name: out[name] for name in IMAGE_ARRAYS}
        return out

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardBuffer:
        """Training targets of a shard in their stored dtypes, read by byte range: the chunk
        indexes now, each view's chunks when taken. ``wanted`` (local images, views) names the
        views this reader will take from the shard (an epoch's, for one loader worker): they are
        read at once, neighbours coalesced (one range per array in ``cycle`` mode)."""
        self._marker(shard)
        opened = ZarrShardBuffer(self, shard, [name for name in TARGET_KEYS if name in self._layouts])
        if wanted is not None:
            opened.fetch(np.asarray(wanted[0]) * self.views + np.asarray(wanted[1]))
        return opened

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        chunks = np.asarray(local, dtype=np.int64) * self.views + np.asarray(views, dtype=np.int64)
        return int(sum(self._load_index(name, shard)[chunks, 1].sum() for name in TARGET_KEYS if name in self._layouts))

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


class ZarrShardBuffer(ShardBuffer):
    """``open_shard``'s result: each array's chunk index, and the compressed bytes of the chunks
    fetched and not yet taken. ``take`` decodes views straight into the batch (stored dtypes);
    a view is taken once per epoch, so its bytes are dropped once decoded."""

    def __init__(self, reader: ZarrReader, shard: int, names: list[str]):
        super().__init__({})
        self.reader, self.shard, self.views, self.names = reader, shard, reader.views, names
        self.index = {name: reader._load_index(name, shard) for name in names}  # (chunks, 2) each
        self.raw: dict[str, dict[int, memoryview]] = {name: {} for name in names}

    def fetch(self, chunks: np.ndarray) -> None:
        """Read the chunks (numbers ``image * views + view``) not yet held, coalesced per array."""
        for name in self.names:
            held = self.raw[name]
            missing = np.asarray(sorted({int(c) for c in chunks} - held.keys()), dtype=np.int64)
            if not len(missing):
                continue
            entries = self.index[name][missing].astype(np.int64)  # a missing chunk: 2^64-1 wraps to -1
            if (entries[:, 1] < 0).any():
                chunk = int(missing[np.flatnonzero(entries[:, 1] < 0)[0]])
                raise self.reader._fail(self.shard, f"'{name}' chunk {chunk} is missing")
            starts, ends = entries[:, 0], entries[:, 0] + entries[:, 1]
            for first, last, members in coalesce(starts, ends):
                data = memoryview(self.reader._cat(self.shard, name, first, last))
                for j in members.tolist():
                    held[int(missing[j])] = data[starts[j] - first:ends[j] - first]

    def fields(self, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return target_fields(self.reader.meta, attn_rows)

    def take(self, local: np.ndarray, views: np.ndarray, attn_rows: int,
             out: dict[str, np.ndarray] | None = None, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        local, views = np.asarray(local, dtype=np.int64), np.asarray(views, dtype=np.int64)
        out, at = self.destination(len(local), attn_rows, out, at)
        chunks = (local * self.views + views).tolist()
        self.fetch(np.asarray(chunks, dtype=np.int64))
        for name in self.names:
            self._decode(name, chunks, at.tolist(), out[name])
        return out

    def _decode(self, name: str, chunks: list[int], slots: list[int], dest: np.ndarray) -> None:
        """Decompress each chunk into ``dest[slot]``; rows past ``dest``'s (attention rows a run
        does not use, top-k ranks beyond them) go through a scratch chunk."""
        full = self.reader._layouts[name].chunk[2:]
        scratch = None if dest.shape[1:] == full else np.empty(full, dtype=dest.dtype)
        for slot, chunk in zip(slots, chunks):
            raw = self.raw[name].pop(chunk)
            target = dest[slot] if scratch is None else scratch
            self.reader._decode_into(self.shard, name, raw, target, f"({chunk // self.views}, {chunk % self.views})")
            if scratch is not None:
                dest[slot] = scratch[:dest.shape[1]]
