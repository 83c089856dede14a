"""A cache that grows: views V..V'-1 added to a complete V-view cache without touching its files.

A cache's shard files hold all V views of their images (zarr: one file per shard and array,
its chunk grid fixed at V views; webdataset: one tar group per view), so more views cannot be
appended to them. Growth writes the new views as a **view part**: a cache of its own in the
sub-folder ``views-V-V'`` of the cache, made by the same stage one with the same settings and
views ``V..V'-1`` drawn exactly as a V'-view cache draws them (crop parameters seeded by
(seed, image, view)). Once the part is complete it is recorded in the cache's metadata file

    tec_cache.json: "grown": [{"views": [V, V'], "path": "views-V-V'"}, ...]

in one atomic write; until then the cache reads as V views (a `kill -9` leaves it usable, and a
rerun resumes the part, whose own completion markers say what is done). ``open_cache`` reads a
grown cache as one of V' views (`GrownReader`); the lineage ("made at V, grown to V'") is
``lineage``. A pq cache's part is encoded with the parts the cache fitted once (never refitted).

Read as one cache (`GrownReader`): view v lies in the piece whose view range holds it, at local
view ``v - first``; images, shards and per-image arrays (valid, label) are the cache's own (every
piece has the same images and shards). A shard buffer of the grown cache splits the views a batch
takes by piece and gathers them into the same batch arrays, so training sees no difference from a
cache made at V'.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..files import write_bytes
from .reader import CacheReader, ShardBuffer
from .schema import (META_FILE, VIEW_ARRAYS, CacheCorruptError, cache_difference, dump_json, short_value,
                     with_recorded_parts)
from .storage import join, read_json

PART_PREFIX = "views-"


@dataclass(frozen=True)
class Growth:
    """One growth step: views [first, stop) written as the part at `url` with metadata `meta`."""

    first: int
    stop: int
    url: str
    meta: dict


def part_name(first: int, stop: int) -> str:
    return f"{PART_PREFIX}{first}-{stop}"


def grown_parts(doc: dict) -> list[dict]:
    """The view parts recorded in a cache's metadata file, in view order."""
    return list(doc.get("grown") or [])


def recorded_views(doc: dict) -> int:
    """The views a cache holds: those it was made with, plus every recorded part's."""
    parts = grown_parts(doc)
    return parts[-1]["views"][1] if parts else int(doc["meta"]["views"])


def with_views(meta: dict, views: int) -> dict:
    """`meta` as a cache of `views` views would record it (layout and identity)."""
    out = copy.deepcopy(meta)
    out["views"] = views
    if "views" in out["identity"].get("data", {}):  # stage one's identity; a store's own tests write others
        out["identity"]["data"]["views"] = views
    return out


def lineage(doc: dict) -> Optional[str]:
    """"made at V views, grown to V' (views-V-V')" for a grown cache; None for one made in one go."""
    parts = grown_parts(doc)
    if not parts:
        return None
    steps = ", ".join(f"{p['views'][1]} ({p['path']})" for p in parts)
    return f"made at {doc['meta']['views']} views, grown to {steps}"


def growth_of(url: str, doc: dict, meta: dict) -> Optional[Growth]:
    """The growth a run of `meta` asks of the complete cache `doc` at `url`: None when it asks for
    no more views than the cache holds, or when another setting differs (the reopen then refuses
    it, naming the setting, as for any cache). The part's metadata is the run's with the part's
    view count, its identity recording the views it holds (``data.first_view``)."""
    have, want = recorded_views(doc), int(meta["views"])
    if not doc.get("complete") or want <= have:
        return None
    made = with_views(meta, int(doc["meta"]["views"]))
    # the reopen's own comparison; a run that grows a pq cache reuses the parts it records
    if cache_difference(doc["meta"], with_recorded_parts(made, doc["meta"])) is not None:
        return None
    return Growth(have, want, join_url(url, part_name(have, want)), part_meta(meta, have, want))


def part_meta(meta: dict, first: int, stop: int) -> dict:
    """The metadata of the view part of views [first, stop) of a cache of `meta`: the cache's, with
    the part's view count and its first view (``first_view``, and ``data.first_view`` in its identity)."""
    part = with_views(meta, stop - first)
    if "data" in part["identity"]:  # stage one's identity; a store's own tests write others
        part["identity"]["data"]["first_view"] = first
    part["first_view"] = first
    part["store_images"] = False  # the source images are the cache's own, stored once
    return part


def check_grown(url: str, doc: dict) -> None:
    """The parts a cache's metadata file lists under ``grown`` (before any is opened): each named
    ``views-<first>-<stop>`` by its own views, the first starting at the cache's ``meta.views``
    and each where the one before stops. Another writer's list that skipped, overlapped or pointed
    elsewhere would be read as views it does not hold; refused in one line naming the entry."""
    have = int(doc["meta"]["views"])
    for entry in grown_parts(doc):
        views, path = entry.get("views"), entry.get("path")
        ok = isinstance(views, list) and len(views) == 2 and all(isinstance(v, int) for v in views)
        if not ok or views[0] != have or views[1] <= have or path != part_name(*views):
            raise CacheCorruptError(f"cache {url}: {META_FILE} lists the view part {entry} after {have} views; "
                                    f"expected {{'views': [{have}, <stop>], 'path': '{PART_PREFIX}{have}-<stop>'}}")
        have = views[1]


def check_part(url: str, doc: dict, entry: dict, part: CacheReader) -> None:
    """A listed part's own metadata is the cache's but for its views (`part_meta`): same images,
    shards, targets, storage and identity. Refused in one line naming the part and the first key
    that differs, where the part's shards would otherwise be read misaligned with the cache's."""
    first, stop = entry["views"]
    want = part_meta(doc["meta"], first, stop)
    want["store_images"] = part.meta.get("store_images")  # a part's own copy (early growth wrote one) is never read
    diff = cache_difference(want, part.meta)
    if diff is not None:
        key, cache_value, part_value = diff
        raise CacheCorruptError(f"cache {url}: its view part {entry['path']} records "
                                f"{key}={short_value(part_value, cache_value)}, the cache "
                                f"{short_value(cache_value, part_value)}: not a part of this cache")


def join_url(url: str, name: str) -> str:
    """`url`/`name` for a local path or an fsspec URL."""
    return url.rstrip("/") + "/" + name


def record_growth(fs, root: str, growth: Growth) -> dict:
    """Add a finished part to the cache's metadata file (one atomic write: before it the cache
    reads as it was, after it with the part's views); the document as the file now holds it."""
    path = join(root, META_FILE)
    doc = read_json(fs, path)
    if any(p["views"] == [growth.first, growth.stop] for p in grown_parts(doc)):
        return doc
    doc["grown"] = [*grown_parts(doc), {"views": [growth.first, growth.stop], "path": part_name(growth.first, growth.stop)}]
    write_bytes(fs, path, dump_json(doc))
    return doc


def unfinished_parts(fs, root: str, doc: dict) -> list[str]:
    """View parts begun in the cache's folder and not recorded (a growth that was stopped): a
    rerun with the same settings finishes them."""
    fs.invalidate_cache(root)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
    recorded = {p["path"] for p in grown_parts(doc)}
    return sorted(n for n in names if n.startswith(PART_PREFIX) and n not in recorded
                  and fs.exists(join(root, n, META_FILE)))


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
        self.num_images, self.views, self.num_shards = made.num_images, recorded_views(made.doc), made.num_shards
        self.doc = {**made.doc, "meta": {**with_views(made.meta, self.views), "lineage": lineage(made.doc)}}
        self.meta = self.doc["meta"]
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
        return {name: np.concatenate([p[name] for p in parts], axis=1) if name in VIEW_ARRAYS else parts[0][name]
                for name in parts[0]}

    def by_piece(self, local: np.ndarray, views: np.ndarray):
        """Each piece with the (local images, views) of it among `local`, `views`, its views counted from 0."""
        local, views = np.asarray(local), np.asarray(views)
        for piece, first in zip(self.pieces, self.firsts):
            keep = (views >= first) & (views < first + piece.views)
            yield piece, local[keep], views[keep] - first

    def open_shard(self, shard: int, wanted: tuple[np.ndarray, np.ndarray] | None = None) -> ShardBuffer:
        if wanted is None:
            return GrownShardBuffer([piece.open_shard(shard, None) for piece in self.pieces], self.firsts)
        return GrownShardBuffer([piece.open_shard(shard, (mine, views)) for piece, mine, views in self.by_piece(*wanted)],
                                self.firsts)

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        if not 0 <= view < self.views:
            raise IndexError(f"(image {image}, view {view}) outside {self.num_images} images x {self.views} views")
        piece, local = self._piece(view)
        return piece.read_view(image, local)

    def image_bytes(self, image: int) -> bytes | None:
        return self.pieces[0].image_bytes(image)

    def view_bytes(self, shard: int, local: np.ndarray, views: np.ndarray) -> int:
        return sum(piece.view_bytes(shard, mine, theirs) for piece, mine, theirs in self.by_piece(local, views)
                   if len(theirs))
