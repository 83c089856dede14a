"""Reading the webdataset store (`wds_format` describes the layout): each shard's completion
marker says where every sample's bytes lie, so a reader fetches exactly the samples it needs with
range requests, neighbours coalesced, and never walks tar headers over the network."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .reader import CacheReader, ShardBuffer, target_fields
from .schema import marker_path
from .storage import coalesce, join, read_json
from .wds_format import IMAGES, group_name, sample_arrays, tar_members



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
            return sample_arrays(sample, self.meta)
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

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardBuffer:
        """Training targets of the views taken (``wanted`` read at once, coalesced), stored dtypes."""
        self._marker(shard)
        return WdsShardBuffer(self, shard, wanted)

    def image_bytes(self, image: int) -> bytes | None:
        """The encoded source image stored in the shard's image tars, or None."""
        if not self.meta.get("store_images"):
            return None
        shard = image // int(self.meta["images_per_shard"])
        self._marker(shard)
        if (image, IMAGES) not in self._index(shard):  # an image that could not be read when cached
            return None
        return next(iter(self._read_samples(shard, [(image, IMAGES)])[(image, IMAGES)].values()))


class WdsShardBuffer(ShardBuffer):
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
        stacked = ShardBuffer({name: np.stack([a[name] for a in arrays])[:, None] for name in arrays[0]})
        zeros = np.zeros(len(pairs), dtype=np.int64)
        return stacked.take(np.arange(len(pairs)), zeros, attn_rows, out, at)
