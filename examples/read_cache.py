"""Read one view of a tec-pipeline target cache without tec-pipeline: its decoded targets and its
crop record, from the files alone, as docs/format.md specifies them (format 2.x, either store).

    python examples/read_cache.py CACHE IMAGE VIEW

Imports numpy, zarr and webdataset, and numcodecs' Zstd for the webdataset members (zstd frames):
neither webdataset nor Python 3.11's standard library decodes zstd, and numcodecs is the library
zarr's own zstd codec calls, installed with zarr. Any zstd decoder reads the frames alike.
Local caches; object storage holds the same files (docs/format.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
import zarr
from numcodecs import Zstd

READS_MAJOR = 2  # the format versions this reader knows: 2.0 and any later 2.x
VIEW_ARRAYS = ("crop", "feat", "feat_step", "feat_mean", "feat_std", "attn", "topk_idx")
ATTN_STEP = np.float32(0.1)  # uint8 attention: logit = -0.1 * u (float32 arithmetic)


def read_metadata(cache: Path) -> dict:
    """``tec_cache.json``, after checking the format version: "MAJOR.MINOR", or an integer MAJOR
    in caches written before it was text. A newer minor only adds what we may ignore."""
    doc = json.loads((cache / "tec_cache.json").read_text())
    version = doc["format_version"]
    major = version if isinstance(version, int) else int(str(version).split(".")[0])
    if major != READS_MAJOR:
        raise SystemExit(f"{cache}: format version {version}, this reader reads {READS_MAJOR}.x")
    return doc


def pq_parts(cache: Path, meta: dict) -> dict[str, np.ndarray]:
    """A pq cache's rotation R (C, C) and codebooks Q (M, 256, d), float32, checked against the
    digest its identity records: sha256 over each part by name (sorted), of the name and the
    shape as Python prints a tuple, then the little-endian float32 bytes in C order."""
    group = zarr.open_group(str(cache), mode="r", path="feat_codec")
    parts = {name: np.ascontiguousarray(group[name][...], dtype="<f4") for name in ("codebooks", "rotation")}
    digest = hashlib.sha256()
    for name, array in parts.items():
        digest.update(f"{name}{array.shape}".encode())
        digest.update(array.tobytes())
    if digest.hexdigest() != meta["identity"]["cache"]["pq_parts_sha256"]:
        raise SystemExit(f"{cache}/feat_codec: the pq parts do not match the digest the identity records")
    return parts


def stored_zarr(cache: Path, meta: dict, image: int, view: int) -> dict[str, np.ndarray]:
    """One view's stored arrays from the zarr group: ``[image, view, ...]`` or ``[image]``."""
    group = zarr.open_group(str(cache), mode="r")
    names = [n for n in VIEW_ARRAYS if n != "feat_step" or meta["feat_dtype"] == "int8"]
    out = {name: np.asarray(group[name][image, view]) for name in names}
    out["valid"], out["label"] = np.asarray(group["valid"][image]), np.asarray(group["label"][image])
    return out


def stored_webdataset(cache: Path, meta: dict, image: int, view: int) -> dict[str, np.ndarray]:
    """One view's stored arrays from its sample in the shard's view tars: ``.npy.zst`` members
    (zstd-compressed .npy) and the ``.json`` with the crop, valid and label."""
    shard = image // meta["images_per_shard"]
    key = f"{image:0{max(8, len(str(meta['num_images'] - 1)))}d}"
    tars = sorted(str(p) for p in cache.glob(f"shard-{shard:05d}-v{view:02d}-*.tar"))
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        if sample["__key__"] == key:
            break
    else:
        raise SystemExit(f"{cache}: no sample {key} in the tars of shard {shard}, view {view}")
    out = {name[:-len(".npy.zst")]: np.load(io.BytesIO(Zstd().decode(data)), allow_pickle=False)
           for name, data in sample.items() if name.endswith(".npy.zst")}
    info = json.loads(sample["json"])
    out["crop"] = np.asarray(info["crop"], np.int32)
    out["valid"], out["label"] = np.asarray(info["valid"], np.uint8), np.asarray(info["label"], np.int64)
    return out


def decode(enc: dict[str, np.ndarray], meta: dict, parts: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Stored dtypes -> float32 targets (feat (L, C), feat_mean, feat_std (C,), attn (k+1, H, L)),
    int64 topk_idx (k,), int32 crop (5,), uint8 valid, int64 label."""
    feat = enc["feat"]
    if meta["feat_dtype"] == "int8":  # x = q * s, s per channel
        feat = feat.astype(np.float32) * enc["feat_step"].astype(np.float32)[None, :]
    elif meta["feat_dtype"] == "pq":  # x = z R^T with z[i * M + m] = Q[m, c_m, i]
        codebooks, rotation = parts["codebooks"], parts["rotation"]
        z = codebooks[np.arange(codebooks.shape[0]), feat.astype(np.intp)]  # (L, M, d)
        feat = np.swapaxes(z, 1, 2).reshape(len(feat), -1) @ rotation.T
    attn = enc["attn"]
    if meta["attn_dtype"] == "uint8":  # logits minus their row's max
        attn = attn.astype(np.float32) * -ATTN_STEP
    return {"feat": feat.astype(np.float32), "feat_mean": enc["feat_mean"].astype(np.float32),
            "feat_std": enc["feat_std"].astype(np.float32), "attn": attn.astype(np.float32),
            "topk_idx": enc["topk_idx"].astype(np.int64), "crop": enc["crop"].astype(np.int32),
            "valid": enc["valid"].astype(np.uint8), "label": enc["label"].astype(np.int64)}


def read_view(cache: str | Path, image: int, view: int) -> dict[str, np.ndarray]:
    """View `view` of image `image`: its decoded targets and its crop [top, left, height, width, flip]."""
    cache = Path(cache)
    doc = read_metadata(cache)
    meta = doc["meta"]
    views = max([meta["views"]] + [part["views"][1] for part in doc.get("grown", [])])
    if not (0 <= image < meta["num_images"] and 0 <= view < views):
        raise SystemExit(f"{cache}: (image {image}, view {view}) outside {meta['num_images']} x {views}")
    parts = pq_parts(cache, meta) if meta["feat_dtype"] == "pq" else None  # fitted once, for every view part
    have = meta["views"]
    for part in doc.get("grown", []):  # a grown cache's views first..end-1: a view part, a cache of its own
        first, end = part["views"]
        if first != have or end <= first or part["path"] != f"views-{first}-{end}":  # contiguous, inside the cache
            raise SystemExit(f"{cache}: tec_cache.json lists the view part {part} after {have} views")
        have = end
        if first <= view < end:
            root, cache, view = cache, cache / part["path"], view - first
            doc = read_metadata(cache)
            if any(doc["meta"][key] != meta[key] for key in ("num_images", "images_per_shard")):
                raise SystemExit(f"{cache}: its images or shards are not those of {root}")
            meta = doc["meta"]
    shard = image // meta["images_per_shard"]
    if not (doc["complete"] or (cache / "_done" / f"shard-{shard:05d}.json").exists()):
        raise SystemExit(f"{cache}: shard {shard} is not complete")
    stored = (stored_zarr if meta["store"] == "zarr" else stored_webdataset)(cache, meta, image, view)
    return decode(stored, meta, parts)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python examples/read_cache.py CACHE IMAGE VIEW")
    targets = read_view(argv[0], int(argv[1]), int(argv[2]))
    for name, value in targets.items():
        print(f"{name:9s} {str(value.dtype):8s} {value.shape}" + (f" {value.tolist()}" if value.size <= 5 else ""))
    # The raw features Y of Eq. 2: Yf * std + mean per channel.
    raw = targets["feat"] * targets["feat_std"] + targets["feat_mean"]
    print(f"raw features: mean |Y| {np.abs(raw).mean():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
