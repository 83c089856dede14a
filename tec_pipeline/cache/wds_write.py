"""Writing the webdataset store (`wds_format` describes the layout): tars built in memory with
fixed headers, so the same data gives the same bytes, each written whole."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from numcodecs import Zstd

from ..files import write_bytes
from .storage import join, parallel_map
from .wds_format import IMAGES, TAR_BLOCK, group_name, key_width, part_name, stored_arrays
from .writer import CacheWriter


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
    return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for _, data in members)


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



class WdsWriter(CacheWriter):
    """Writes each shard as size-bounded tars, one group per view; see the module docstring."""

    def _init_layout(self) -> None:
        self._zstd = Zstd(level=int(self.meta["zstd_level"]), checksum=True)
        self._width = key_width(int(self.meta["num_images"]))
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

