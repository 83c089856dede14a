"""How the bytes of one zarr chunk are stored: ``cache.compress``. Each setting is a chain of zarr
v3 codecs, so zarr itself reads the files:

- ``zstd``: ``bytes -> zstd(level, checksum)``; the smallest files (int8 features shrink a
  little, uint8 attention most), at the highest CPU cost per byte;
- ``lz4``: ``bytes -> blosc(lz4, no shuffle) -> crc32c``; uint8 attention shrinks less, int8
  and float16 features are stored as they are (blosc keeps incompressible blocks raw), for far
  less CPU per byte than zstd;
- ``none``: ``bytes -> crc32c``; the bytes as they are, no codec call at all.

The crc32c (zarr's 4-byte little-endian trailer) keeps a damaged chunk detectable where zstd's
own checksum is absent. A chunk is encoded to a short list of buffers (the stored chunk is their
concatenation), so the raw bytes of ``none`` go to the file without a copy.
"""
from __future__ import annotations

import google_crc32c
import numpy as np
from numcodecs import Zstd, blosc
from numcodecs.zstd import decompress as zstd_decompress
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

COMPRESS = ("zstd", "lz4", "none")
LZ4_CLEVEL = 1  # blosc's fastest lz4: higher levels gain nothing on these targets
# The chunk codecs of each setting as zarr.json names them (after "bytes").
ZARR_NAMES = {"zstd": ["bytes", "zstd"], "lz4": ["bytes", "blosc", "crc32c"], "none": ["bytes", "crc32c"]}


def crc32c_trailer(data) -> bytes:
    """zarr's crc32c codec trailer of `data`: its CRC-32C, 4 bytes little-endian."""
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


class ChunkCodec:
    """Encodes chunks of one array (`dtype`) in one ``cache.compress`` setting and decodes them
    back into preallocated arrays; `zarr_compressors` are the same chain for ``zarr.json``."""

    def __init__(self, compress: str, zstd_level: int, dtype: np.dtype):
        if compress not in COMPRESS:
            raise ValueError(f"compress={compress!r}: expected one of {', '.join(COMPRESS)}")
        self.compress, self.itemsize = compress, np.dtype(dtype).itemsize
        self._zstd = Zstd(level=zstd_level, checksum=True)  # the frames zarr's ZstdCodec(checksum) makes
        self.zarr_compressors = {
            "zstd": [ZstdCodec(level=zstd_level, checksum=True)],
            "lz4": [BloscCodec(cname="lz4", clevel=LZ4_CLEVEL, shuffle="noshuffle", typesize=self.itemsize,
                               blocksize=0), Crc32cCodec()],
            "none": [Crc32cCodec()],
        }[compress]

    @property
    def concatenates(self) -> bool:
        """Whether chunks lying back to back decode with one call (zstd frames do)."""
        return self.compress == "zstd"

    def encode(self, chunk: np.ndarray) -> list:
        """One C-contiguous little-endian chunk -> the buffers of its stored bytes, in order."""
        if self.compress == "zstd":
            return [self._zstd.encode(chunk)]
        payload = chunk.reshape(-1).view(np.uint8)
        if self.compress == "lz4":
            payload = blosc.compress(payload, b"lz4", LZ4_CLEVEL, blosc.NOSHUFFLE, 0, self.itemsize)
        return [payload, crc32c_trailer(payload)]

    def decode_into(self, raw, out: np.ndarray) -> None:
        """One stored chunk -> ``out`` (contiguous, the chunk's size); raises ValueError (or the
        codec's error) on a checksum or size mismatch."""
        dest = out.reshape(-1).view(np.uint8)
        if self.compress == "zstd":
            zstd_decompress(raw, dest)
            return
        raw = np.frombuffer(raw, np.uint8)  # google_crc32c takes arrays, not writable memoryviews
        payload, trailer = raw[:-4], raw[-4:]
        if len(raw) < 4 or crc32c_trailer(payload) != trailer.tobytes():
            raise ValueError("the chunk fails its crc32c")
        if self.compress == "none":
            if len(payload) != len(dest):
                raise ValueError(f"the chunk holds {len(payload)} bytes, expected {len(dest)}")
            dest[:] = payload
        else:
            nbytes = int(payload[4:8].view("<u4")[0]) if len(payload) >= 16 else -1  # blosc1 header: bytes 4-7
            if nbytes != len(dest):
                raise ValueError(f"the chunk decodes to {nbytes} bytes, expected {len(dest)}")
            blosc.decompress(payload, dest)
