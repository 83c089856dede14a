"""`tec-pipeline verify`: recompute a random sample of a cache's views from its metadata alone and
compare them with what is stored.

Checked in order, each failure one line: the recorded files of every completed shard, that no
shard is missing, that the source and the base weights are those that wrote the cache, then
each sampled view, re-rendered by the renderer that made the cache (its crop, features, attention
rows and top-k), against the tolerances of `tec_pipeline.cache_targets.verify`.
"""
from __future__ import annotations

import torch

from tec_pipeline.base_targets import base_sha256, load_base
from tec_pipeline.cache.store import open_cache
from tec_pipeline.config import ViTArch
from tec_pipeline.data import open_source_at
from tec_pipeline.errors import UserError
from tec_pipeline.cache_targets.verify import cache_renderer, check_files, pick_views, verify_view


def verify_cache(url: str, sample: int = 8, seed: int = 0) -> bool:
    """Re-render `sample` random views from the cache's metadata, recompute them with the base
    model and compare with what is stored; one line per view, False on any mismatch."""
    if sample < 0:
        raise UserError(f"--sample {sample}: expected a number of views >= 0 (0: check the files only)")
    reader = open_cache(url)
    meta = reader.meta
    if "source" not in meta or "base" not in meta:
        raise UserError(f"cache {url} has no source/base metadata (not written by cache-targets)")
    if meta.get("lineage"):  # a grown cache: its view parts are read, and sampled, as its other views
        print(f"lineage: {meta['lineage']}")
    ok = check_files(reader)
    missing = reader.missing_shards()
    if missing:
        print(f"FAIL cache incomplete: {len(missing)} of {reader.num_shards} shards missing (first {missing[:5]})")
        ok = False
    source = open_source_at(meta["source"]["kind"], meta["source"]["path"])
    if source.fingerprint() != meta["source"]["fingerprint"]:
        print(f"FAIL source {meta['source']['path']} changed since the cache was written (fingerprint differs)")
        return False
    base = load_base(ViTArch(**meta["base"]["arch"]), meta["base"]["checkpoint"], meta["img_size"], meta["seed"])
    if base_sha256(meta["base"]["checkpoint"], base) != meta["base"]["checkpoint_sha256"]:
        print(f"FAIL base weights differ from those that wrote the cache ({meta['base']['checkpoint'] or 'random init'})")
        return False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device)
    renderer = cache_renderer(meta, device)
    picks = pick_views(reader, missing, sample, seed)
    good = sum(verify_view(reader, source, base, renderer, image, view) for image, view in picks)
    print(f"verify: {good} of {len(picks)} sampled views match within tolerance; "
          f"cache {'OK' if ok and good == len(picks) else 'FAILED'}")
    return ok and good == len(picks)
