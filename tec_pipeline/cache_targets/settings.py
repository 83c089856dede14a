"""Stage one's settings: refused before anything is computed, then recorded in the cache.

The metadata a cache carries has three readers: the store (its layout), a rerun (``identity``:
what must match to resume rather than refuse) and ``verify`` (where the source and the
checkpoint are, and how views were drawn, so that any view can be rebuilt).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..base_targets import base_sha256, compute_dtype, dtype_name
from ..config import Config, flatten, to_dict
from ..data import source_location
from ..cache.pq import check_subvectors
from ..cache.storage import fs_root
from ..errors import UserError
from ..files import is_local
from ..models.base import check_sizes
from ..places import check_cache_place
from ..rules import RULES


def check_settings(cfg: Config) -> None:
    """Refuse, before anything is loaded, what the settings' domains and rules (checked when the
    config was loaded) cannot: a base size left to timm's default that breaks a rule (`check_sizes`),
    a cache where a run lies."""
    check_sizes(flatten(to_dict(cfg)), "base.arch", RULES)
    fs, root = fs_root(cfg.cache.path)  # an unknown storage protocol is refused here too
    if is_local(fs):
        check_cache_place(root)


def check_base(cfg: Config, base) -> None:
    """Settings that need the built base (its patch grid and width; the rules on its sizes were
    checked before it was built, `check_settings`): k_max, pq_subvectors."""
    patch, num_patches = base.patch_embed.patch_size[0], base.patch_embed.num_patches
    if cfg.cache.k_max > num_patches:
        raise UserError(f"cache.k_max={cfg.cache.k_max} exceeds the {num_patches} patches of a "
                        f"{cfg.data.img_size}px image at patch {patch}")
    if cfg.cache.feat_dtype == "pq":
        if cfg.cache.pq_subvectors is None:
            raise UserError(f"cache.feat_dtype=pq needs cache.pq_subvectors: codes per patch, dividing the base's "
                            f"feature width {base.embed_dim} (e.g. {base.embed_dim // 4}; fewer is smaller and coarser)")
        check_subvectors(cfg.cache.pq_subvectors, base.embed_dim)


def images_per_batch(cfg: Config) -> int:
    """Images in one base forward: stage one's data.batch_size counts views, so a forward's size
    (and memory) does not grow with data.views, and all views of an image go in the same batch."""
    return max(1, cfg.data.batch_size // cfg.data.views)


def cache_meta(cfg: Config, source, base, precision: str, loader: str) -> dict:
    """Metadata of the cache: layout for the store, `identity` for resume checks, and what
    `verify` needs to rebuild any view (source location, checkpoint path, view settings, the
    compute precision, the renderer). `precision` is ``base.compute_dtype`` resolved (fp16, bf16
    or fp32) and `loader` ``data.loader`` resolved (pil or dali): a cache made in one precision or
    with one renderer is not resumed with another."""
    d, c = cfg.data, cfg.cache
    arch = {**asdict(cfg.base.arch), "img_size": d.img_size}
    ckpt = cfg.base.checkpoint
    ckpt_sha = base_sha256(ckpt, base)
    fingerprint = source.fingerprint()  # stats every file of an ImageFolder: once
    pq = {"pq_subvectors": c.pq_subvectors} if c.feat_dtype == "pq" else {}  # the parts' digest joins once fitted
    # Keys mirror the config, so a refused rerun names the setting to change ("data.views").
    identity = {
        "base": {"arch": arch, "checkpoint_sha256": ckpt_sha, "compute_dtype": precision},
        "seed": cfg.seed,
        "data": {"img_size": d.img_size, "views": d.views, "scale_min": d.scale_min, "scale_max": d.scale_max,
                 "fingerprint": fingerprint, "num_images": len(source), "loader": loader},
        "targets": {"last_layers": cfg.targets.last_layers},
        "cache": {"k_max": c.k_max, "feat_dtype": c.feat_dtype, "attn_dtype": c.attn_dtype, "store": c.store, **pq},
    }
    return {
        "store": c.store, "num_images": len(source), "views": d.views,
        "num_patches": base.patch_embed.num_patches, "feat_dim": base.embed_dim,
        "heads": base.blocks[-1].attn.num_heads, "k_max": c.k_max, "images_per_shard": c.images_per_shard,
        "feat_dtype": c.feat_dtype, "attn_dtype": c.attn_dtype, "compress": c.compress, "zstd_level": c.zstd_level,
        "store_images": c.store_images, **pq, "identity": identity,
        "source": {"kind": d.kind, "path": source_location(d.kind, d.path), "num_images": len(source),
                   "fingerprint": fingerprint},
        "base": {"arch": arch, "checkpoint": str(Path(ckpt).absolute()) if ckpt else None,
                 "checkpoint_sha256": ckpt_sha, "patch_size": base.patch_embed.patch_size[0],
                 "embed_dim": base.embed_dim, "depth": len(base.blocks), "num_heads": base.blocks[-1].attn.num_heads},
        "seed": cfg.seed, "img_size": d.img_size, "scale": [d.scale_min, d.scale_max],
        "last_layers": cfg.targets.last_layers, "compute_dtype": dtype_name(compute_dtype(precision)),
        "package_version": __version__,
    }


def non_finite_error(err: UserError, meta: dict) -> UserError:
    """A non-finite target as one line naming the setting to change: the base forward
    overflowed its compute precision (fp16 beyond 65504); nothing of that shard is written."""
    precision = meta["identity"]["base"]["compute_dtype"]
    change = {"fp16": "bf16 or fp32", "bf16": "fp32"}.get(precision)
    advice = (f"the base overflowed in base.compute_dtype={precision}: set base.compute_dtype={change}" if change
              else "the base itself gives them in fp32 (check base.checkpoint)")
    return UserError(f"{err}; {advice}; the shard was not written (a rerun resumes)")
