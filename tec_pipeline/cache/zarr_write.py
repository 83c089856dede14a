"""Writing the zarr store (`zarr_format` describes the layout).

zarr creates the group and the arrays' ``zarr.json`` (``LocalStore`` for paths, ``FsspecStore``
for URLs). Shard files are encoded and written here, in exactly the format those ``zarr.json``
describe (one encoded chunk after another, then the offset/length index and its crc32c; zarr
reads them back, tested): zarr's async codec pipeline does per-chunk work we do not need, and
writing the files ourselves makes each one atomic and fsynced (temporary name + rename), the
encoded chunks handed to ``writev`` as they are, never joined into one copy.
"""
from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
from zarr.errors import ContainsArrayError

from ..files import is_local, write_bytes, write_files_durably
from .chunk_codec import ChunkCodec
from .writer import CacheWriter
from .zarr_format import DIM_NAMES, MAX_UINT_64, array_layout, shard_key, zarr_store
from .storage import join, parallel_map


class ZarrWriter(CacheWriter):
    """Creates the arrays through zarr and writes whole shard files; see the module docstring."""

    def _init_layout(self) -> None:
        """Create the group and arrays, or open the ones already there (idempotent)."""
        group = zarr.open_group(zarr_store(self.url, self.fs, self.root), mode="a", zarr_format=3)
        self._arrays, self._codecs = {}, {}
        for name, spec in self.specs.items():
            shape, chunks, shards = array_layout(spec, self.meta)
            codec = ChunkCodec(self.meta["compress"], int(self.meta["zstd_level"]), np.dtype(spec.dtype))
            try:
                arr = group.create_array(
                    name, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
                    compressors=codec.zarr_compressors, fill_value=0, dimension_names=DIM_NAMES[name])
            except ContainsArrayError:
                arr = zarr.open_array(group.store_path / name, mode="r+")
            self._arrays[name], self._codecs[name] = arr, codec

    def _shard_files(self, shard: int) -> list[str]:
        return [shard_key(name, len(arr.shape), shard) for name, arr in self._arrays.items()]

    def _clear_shard(self, shard: int) -> None:
        """Remove what a crashed earlier attempt may have left (a rewrite replaces it anyway)."""
        for rel in self._shard_files(shard):
            path = join(self.root, rel)
            for leftover in ([path] if self.fs.exists(path) else []) + self.fs.glob(path + ".tmp-*"):
                self.fs.rm(leftover)

    def _write_encoded(self, shard: int, enc: dict[str, np.ndarray], images) -> dict[str, int]:
        """Every array's shard file, written together (``files.write_files_durably``: one fsync
        per file, one per directory, ``O_DIRECT`` with ``direct_io``) locally, one PUT each elsewhere."""
        files = {}
        for name, arr in self._arrays.items():
            _, chunk, shard_shape = array_layout(self.specs[name], self.meta)
            grid = tuple(s // c for s, c in zip(shard_shape, chunk))
            files[shard_key(name, len(arr.shape), shard)] = shard_file(enc[name], grid, self._codecs[name])
        if is_local(self.fs):
            write_files_durably({join(self.root, rel): buffers for rel, buffers in files.items()},
                                direct=self.direct_io)
        else:
            for rel, buffers in files.items():
                write_bytes(self.fs, join(self.root, rel), b"".join(buffers))
        return {rel: sum(map(len, buffers)) for rel, buffers in files.items()}


def shard_file(arr: np.ndarray, grid: tuple[int, ...], codec: ChunkCodec) -> list:
    """One zarr v3 shard (sharding_indexed, index at the end) of chunks ``[1, 1, ...]`` / ``[1]``,
    as the buffers whose concatenation is the file.

    ``arr`` holds the shard's images ``[n, views, ...]`` or ``[n]``; ``grid`` is the chunk
    grid of a full shard (images_per_shard, views, 1, ...). Each chunk is its little-endian
    bytes through `codec` (``cache.compress``), as zarr's codec chain writes it; chunks past the
    array's end (last shard) are absent (offset = length = 2^64-1). Chunks are laid out
    view-major (the index, not the file order, is what zarr reads), so one view of every image
    of the shard is one contiguous byte range.
    """
    n, views = arr.shape[0], (arr.shape[1] if len(grid) > 1 else 1)
    chunks = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(n * views, -1)
    # chunk number image * views + view (zarr's order); the file holds them view-major: all images'
    # view 0, then view 1, ...
    order = np.arange(n * views).reshape(n, views).T.ravel()
    encoded = parallel_map(lambda c: codec.encode(chunks[c]), order.tolist())
    lengths = np.fromiter((sum(map(len, parts)) for parts in encoded),
                          dtype=np.uint64, count=len(encoded))
    index = np.full((int(np.prod(grid)), 2), MAX_UINT_64, dtype="<u8")
    index[order, 0] = np.cumsum(lengths) - lengths
    index[order, 1] = lengths
    body = index.tobytes()
    return [b for parts in encoded for b in parts] + [body, np.uint32(google_crc32c.value(body)).tobytes()]
