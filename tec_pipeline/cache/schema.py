"""Cache schema: metadata checks, array layout, identity comparison and completion markers.

A cache is a directory or fsspec URL (docs/format.md specifies every file and key) holding

- ``tec_cache.json``: format version, ``meta`` (sizes, dtypes, the ``identity`` of the run
  that made it), the per-shard completion listing, the ``complete`` flag and the summary;
- ``_done/shard-NNNNN.json``: one completion marker per shard, written only after that
  shard's data is durable. The markers are the truth while a cache is being written (several
  processes write disjoint shards and never touch a shared file); ``finalize`` folds them
  into ``tec_cache.json``;
- the data: a zarr v3 group (``zarr_format``) or webdataset tars (``wds_format``).
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from ..config import DOMAINS, flatten
from ..errors import UserError
from ..places import CACHE_FILE
from .chunk_codec import COMPRESS
from .pq import CENTROIDS, check_subvectors
from .storage import join, read_json

# "MAJOR.MINOR" (docs/format.md, "Versions"). A reader reads every minor of its own major: a minor
# only adds what an older reader may ignore. 2: in each shard file the chunks of one view index lie
# together (view-major), so an epoch that uses one view per image reads one contiguous range per
# shard and array; a major-1 cache (chunks image by image) is refused, not read in the wrong order.
# Caches before the version was written "MAJOR.MINOR" hold the integer 1 or 2 (= "1.0", "2.0").
FORMAT_VERSION = "2.1"
META_FILE = CACHE_FILE
DONE_DIR = "_done"

STORES = ("zarr", "webdataset")
FEAT_DTYPES = ("float32", "float16", "int8", "pq")
ATTN_DTYPES = ("float32", "float16", "uint8")
REQUIRED_META = ("store", "num_images", "views", "num_patches", "feat_dim", "heads", "k_max",
                 "images_per_shard", "feat_dtype", "attn_dtype", "zstd_level", "identity")
# Meta keys that fix the on-storage layout: a reopened cache must agree on them too, or a
# resumed run would write shards that do not fit the ones already there.
LAYOUT_KEYS = ("store", "num_images", "views", "num_patches", "feat_dim", "heads", "k_max",
               "images_per_shard", "feat_dtype", "attn_dtype", "compress", "zstd_level", "store_images",
               "max_part_bytes", "pq_subvectors")
PQ_PARTS_KEY = "pq_parts_sha256"  # identity.cache: the digest of a pq cache's fitted parts, once recorded
DEFAULT_MAX_PART_BYTES = 256 * 2**20  # webdataset: tar parts of at most ~256 MiB

# Arrays indexed [image, view, ...] ("per view") and [image] ("per image").
VIEW_ARRAYS = ("crop", "feat", "feat_mean", "feat_std", "attn", "topk_idx")
IMAGE_ARRAYS = ("valid", "label")
DATA_KEYS = VIEW_ARRAYS + IMAGE_ARRAYS


class CacheMismatchError(UserError):
    """An existing cache was made by a different configuration than this run's."""


class CacheCorruptError(UserError):
    """A shard's files are missing, truncated or fail their checksums."""


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: trailing shape after the leading [image] or [image, view] dims."""

    name: str
    tail: tuple[int, ...]
    dtype: str  # numpy dtype name as stored
    per_view: bool = True


def normalize_meta(meta: dict) -> dict:
    """Check the metadata a writer needs and return it JSON-normalized (tuples -> lists).

    Unknown keys are kept: they are recorded as given.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"cache meta lacks {', '.join(missing)}")
    meta = json.loads(json.dumps(meta))
    meta.setdefault("store_images", False)
    meta.setdefault("compress", "zstd")  # a meta with no compress key describes zstd chunks
    if meta["store"] == "webdataset":
        meta.setdefault("max_part_bytes", DEFAULT_MAX_PART_BYTES)
    for key, choices in (("store", STORES), ("feat_dtype", FEAT_DTYPES), ("attn_dtype", ATTN_DTYPES),
                         ("compress", COMPRESS)):
        if meta[key] not in choices:
            raise UserError(f"cache.{key}='{meta[key]}': expected one of {', '.join(choices)}")
    if meta["feat_dtype"] == "pq":
        check_subvectors(int(meta.get("pq_subvectors") or 0), int(meta["feat_dim"]))
    if meta["store_images"] and meta["store"] != "webdataset":
        raise UserError("cache.store_images=true needs cache.store=webdataset")
    if meta["compress"] != "zstd" and meta["store"] != "zarr":
        raise UserError(f"cache.compress={meta['compress']} needs cache.store=zarr (webdataset members are zstd)")
    for key in ("num_images", "views", "num_patches", "feat_dim", "heads", "images_per_shard"):
        if int(meta[key]) < 1:
            raise UserError(f"cache meta {key}={meta[key]}: must be >= 1")
    if not 1 <= int(meta["k_max"]) <= int(meta["num_patches"]):  # zarr cannot chunk a 0-length axis;
        # k = 0 (the cls row only) is a prefix of any k_max >= 1
        raise UserError(f"cache.k_max={meta['k_max']}: must be within 1..{meta['num_patches']}")
    level = DOMAINS["cache.zstd_level"]
    if not level.allows(meta["zstd_level"]):
        raise UserError(f"cache.zstd_level={meta['zstd_level']}: expected {level}")
    if not isinstance(meta["identity"], dict):
        raise ValueError("cache meta 'identity' must be a dict")
    return meta


def parse_version(value: Any) -> tuple[int, int] | None:
    """(major, minor) of a recorded ``format_version``: the text "MAJOR.MINOR", or the integer MAJOR
    that caches hold from before it was text; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, 0
    match = re.fullmatch(r"(\d+)\.(\d+)", value) if isinstance(value, str) else None
    return (int(match[1]), int(match[2])) if match else None


def array_specs(meta: dict) -> dict[str, ArraySpec]:
    """The stored arrays and their storage dtypes for this metadata.

    Why these dtypes: int8 features carry a per (view, channel) step array ``feat_step``
    (float16, ~1.5 KB/view at C=768); mean/std follow the feature precision (float16 unless
    float32 is asked for: 3 KB instead of 6 KB per view); top-k indices fit int16. pq features
    are M uint8 codes per patch (``pq``), their parts stored once per cache (``pq_parts``).
    """
    L, C, H, k = (int(meta[x]) for x in ("num_patches", "feat_dim", "heads", "k_max"))
    feat_dtype, attn_dtype = meta["feat_dtype"], meta["attn_dtype"]
    stat_dtype = "float32" if feat_dtype == "float32" else "float16"
    specs = [
        ArraySpec("crop", (5,), "int32"),
        ArraySpec("feat", (L, int(meta["pq_subvectors"])) if feat_dtype == "pq" else (L, C),
                  "uint8" if feat_dtype == "pq" else feat_dtype),
        ArraySpec("feat_mean", (C,), stat_dtype),
        ArraySpec("feat_std", (C,), stat_dtype),
        ArraySpec("attn", (k + 1, H, L), attn_dtype),
        ArraySpec("topk_idx", (k,), "int16" if L <= np.iinfo(np.int16).max else "int32"),
        ArraySpec("valid", (), "uint8", per_view=False),
        ArraySpec("label", (), "int64", per_view=False),
    ]
    if feat_dtype == "int8":
        specs.insert(2, ArraySpec("feat_step", (C,), "float16"))
    return {s.name: s for s in specs}


def pq_parts_digest(meta: dict) -> str | None:
    """The recorded digest of a pq cache's fitted parts; None before they are recorded (or not pq)."""
    return meta["identity"].get("cache", {}).get(PQ_PARTS_KEY)


def with_recorded_parts(run_meta: dict, cache_meta: dict) -> dict:
    """`run_meta` holding the parts digest `cache_meta` records: a run that reopens a pq cache
    reuses its fitted parts, so they are part of what it resumes, not something it must know."""
    digest = pq_parts_digest(cache_meta)
    if digest is None or pq_parts_digest(run_meta) is not None:
        return run_meta
    return {**run_meta, "identity": with_parts_digest(run_meta["identity"], digest)}


def with_parts_digest(identity: dict, digest: str) -> dict:
    """`identity` with the digest of the cache's pq parts under ``cache``."""
    return {**identity, "cache": {**identity.get("cache", {}), PQ_PARTS_KEY: digest}}


def pq_description(meta: dict) -> str:
    """``M x 256``: a pq cache's setting as one short text."""
    return f"{meta['pq_subvectors']} sub-vectors x {CENTROIDS} centroids"


def num_shards(meta: dict) -> int:
    n, s = int(meta["num_images"]), int(meta["images_per_shard"])
    return (n + s - 1) // s


def shard_range(meta: dict, shard: int) -> range:
    """Image indices of one shard: ``[shard * S, min((shard + 1) * S, N))``."""
    if not 0 <= shard < num_shards(meta):
        raise IndexError(f"shard {shard} out of range 0..{num_shards(meta) - 1}")
    s = int(meta["images_per_shard"])
    return range(shard * s, min((shard + 1) * s, int(meta["num_images"])))


# ----------------------------------------------------------------------------- identity


def short_value(value: Any, other: Any) -> str:
    """A value for a one-line message: long strings cut to 12 characters + '..' unless
    cutting would hide the difference."""
    text, other_text = str(value), str(other)
    if len(text) > 16 and text[:12] != other_text[:12]:
        return text[:12] + ".."
    return text


def first_difference(old: dict, new: dict, shared_only: bool = False) -> tuple[str, Any, Any] | None:
    """The first key (dotted, sorted) whose value differs between two nested dicts; with
    `shared_only`, keys only one of them holds are not compared."""
    a, b = flatten(old), flatten(new)
    for key in sorted(set(a) & set(b) if shared_only else set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            return key, a.get(key, "<missing>"), b.get(key, "<missing>")
    return None


def cache_difference(old_meta: dict, new_meta: dict) -> tuple[str, object, object] | None:
    """The first identity or layout key (the latter as ``cache.<key>``) whose value differs
    between a cache's metadata and a run's, with both values; None if none does."""
    diff = first_difference(old_meta.get("identity", {}), new_meta["identity"])
    if diff is None:
        diff = first_difference({k: old_meta.get(k) for k in LAYOUT_KEYS},
                                {k: new_meta.get(k) for k in LAYOUT_KEYS})
        if diff is not None:
            diff = ("cache." + diff[0],) + diff[1:]
    return diff


def check_same_cache(url: str, old_meta: dict, new_meta: dict) -> None:
    """Raise CacheMismatchError naming the first differing identity or layout key."""
    diff = cache_difference(old_meta, new_meta)
    if diff is not None:
        key, was, now = diff
        raise CacheMismatchError(
            f"cache {url} was made with {key}={short_value(was, now)}, this run has {short_value(now, was)}; "
            "use --overwrite to replace it")


# ----------------------------------------------------------------------------- files


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def marker_path(root: str, shard: int) -> str:
    return join(root, DONE_DIR, f"shard-{shard:05d}.json")


def done_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[int]:
    """Shards with a completion marker, from the listing alone (no marker is read)."""
    done_dir = join(root, DONE_DIR)
    fs.invalidate_cache(done_dir)  # other processes write markers; object-store clients cache listings
    if not fs.exists(done_dir):
        return set()
    names = (posixpath.basename(p) for p in fs.ls(done_dir, detail=False))
    return {int(n[len("shard-"):-len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}


def read_markers(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """All per-shard completion markers present: {shard: marker}."""
    done_dir = join(root, DONE_DIR)
    fs.invalidate_cache(done_dir)
    if not fs.exists(done_dir):
        return {}
    markers = {}
    for path in fs.ls(done_dir, detail=False):
        name = posixpath.basename(path)
        if name.startswith("shard-") and name.endswith(".json"):
            marker = read_json(fs, path)
            markers[int(marker["shard"])] = marker
    return markers


