"""Reading a grown cache (`growth`): the cache as made (views 0..V-1) and its view parts, read as
one cache of V' views.

View v lies in the piece whose view range holds it, at local view ``v - first``; images,
shards and per-image arrays (valid, label) are the cache's own (every piece has the same images
and shards). A shard buffer of the grown cache splits the views a batch takes by piece and
gathers them into the same batch arrays, so training sees no difference from a cache made at V'.
"""
from __future__ import annotations

import numpy as np

from .growth import lineage, recorded_views, with_views
from .reader import CacheReader, ShardBuffer
from .schema import VIEW_ARRAYS


class GrownShardBuffer(ShardBuffer):
    """One shard of every piece; ``take`` routes each view to its piece."""

    def __init__(self, buffers: list[ShardBuffer], firsts: list[int]):
        super().__init__({})
        self.buffers, self.firsts = buffers, np.asarray(firsts + [np.iinfo(np.int64).max])

    def fields(self, attn_rows: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return self.buffers[0].fields(attn_rows)

    def take(self, local: np.ndarray, views: np.ndarray, attn_rows: int,
             out: dict[str, np.ndarray] | None = None, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        local, views = np.asarray(local, dtype=np.int64), np.asarray(views, dtype=np.int64)
        out, at = self.destination(len(local), attn_rows, out, at)
        piece = np.searchsorted(self.firsts, views, side="right") - 1
        for p in np.unique(piece).tolist():
            mine = piece == p
            self.buffers[p].take(local[mine], views[mine] - self.firsts[p], attn_rows, out, at[mine])
        return out


class GrownReader(CacheReader):
    """A grown cache as one of V' views: `pieces` are the cache as made, then each view part."""

    def __init__(self, pieces: list[CacheReader]):
        # Not CacheReader.__init__: the pieces, opened by `open_cache`, already read their metadata
        # and markers; this reader takes the cache's own (images, shards, pq parts) from the first.
        made = pieces[0]
        self.pieces, self.firsts = pieces, [0]
        for piece in pieces[:-1]:
            self.firsts.append(self.firsts[-1] + piece.views)
        self.url, self._fs, self._fs_pid, self.root = made.url, made._fs, made._fs_pid, made.root
        self.doc = {**made.doc, "meta": {**with_views(made.meta, recorded_views(made.doc)), "lineage": lineage(made.doc)}}
        self.meta = self.doc["meta"]
        self.num_images, self.views, self.num_shards = made.num_images, recorded_views(made.doc), made.num_shards
        self.feat_codec = made.feat_codec
        self._markers = made._markers
        self._reset_caches()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "pieces": self.pieces, "firsts": self.firsts}

    def _piece(self, view: int) -> tuple[CacheReader, int]:
        p = int(np.searchsorted(self.firsts, view, side="right")) - 1
        return self.pieces[p], view - self.firsts[p]

    def is_complete(self) -> bool:
        return all(piece.is_complete() for piece in self.pieces)

    def missing_shards(self) -> list[int]:
        return sorted({s for piece in self.pieces for s in piece.missing_shards()})

    def damaged_shards(self) -> dict[int, str]:
        """{shard: why} over every piece; a part's file is named with its folder."""
        found: dict[int, str] = {}
        for piece in reversed(self.pieces):
            prefix = "" if piece is self.pieces[0] else piece.root.rstrip("/").rsplit("/", 1)[-1] + "/"
            found.update({s: why.replace("file ", "file " + prefix, 1) for s, why in piece.damaged_shards().items()})
        return found

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        parts = [piece.read_shard(shard) for piece in self.pieces]
        return {name: (np.concatenate([p[name] for p in parts], axis=1) if name in VIEW_ARRAYS or name == "feat_step"
                       else parts[0][name]) for name in parts[0]}

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardBuffer:
        buffers = []
        for piece, first in zip(self.pieces, self.firsts):
            mine = None
            if wanted is not None:
                local, views = np.asarray(wanted[0]), np.asarray(wanted[1])
                keep = (views >= first) & (views < first + piece.views)
                mine = (local[keep], views[keep] - first)
            buffers.append(piece.open_shard(shard, mine))
        return GrownShardBuffer(buffers, self.firsts)

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        if not 0 <= view < self.views:
            raise IndexError(f"(image {image}, view {view}) outside {self.num_images} images x {self.views} views")
        piece, local = self._piece(view)
        return piece.read_view(image, local)

    def image_bytes(self, image: int) -> bytes | None:
        return self.pieces[0].image_bytes(image)

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        local, views = np.asarray(local), np.asarray(views)
        total = 0
        for piece, first in zip(self.pieces, self.firsts):
            keep = (views >= first) & (views < first + piece.views)
            if keep.any():
                total += piece.view_bytes(shard, local[keep], views[keep] - first)
        return total
