"""What a run's targets can serve: their shape from a cache's metadata, a base model or the pixel
target, and the refusal, before training, of a request they cannot serve."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cache.schema import CacheMismatchError  # the one error for a cache that cannot serve a request
from ..models.base import file_sha256
from ..pixels import pixel_feat_dim


@dataclass(frozen=True)
class TargetSpec:
    """Shape of the targets a run trains on."""

    img_size: int
    num_patches: int
    feat_dim: int  # C_base (or p*p*3 for pixels)
    heads: int  # H_base (0: no attention target)
    k_max: int  # attention rows available beyond the cls row


def cache_spec(meta: dict) -> TargetSpec:
    """The `TargetSpec` recorded in a cache's metadata."""
    return TargetSpec(img_size=int(meta["img_size"]), num_patches=int(meta["num_patches"]),
                      feat_dim=int(meta["feat_dim"]), heads=int(meta["heads"]), k_max=int(meta["k_max"]))


def base_spec(base, img_size: int) -> TargetSpec:
    """The `TargetSpec` of a base model computing targets online (any k up to L is available)."""
    L = base.patch_embed.num_patches
    return TargetSpec(img_size=img_size, num_patches=L, feat_dim=base.embed_dim,
                      heads=base.blocks[-1].attn.num_heads, k_max=L)


def pixel_spec(img_size: int, patch: int) -> TargetSpec:
    """The `TargetSpec` of MAE's pixel target: p*p*3 channels per patch, no attention target."""
    return TargetSpec(img_size, (img_size // patch) ** 2, pixel_feat_dim(patch), heads=0, k_max=0)


def check_request(spec: TargetSpec, *, img_size: int, num_patches: int, k: int, attention: str,
                  what: str = "the cache") -> None:
    """Refuse, before training, a request the targets cannot serve.

    Raises `CacheMismatchError` with one line naming the setting: image size, patch grid,
    or ``targets.k`` beyond ``k_max`` (any k <= k_max is a prefix of the stored rows).
    """
    if img_size != spec.img_size:
        raise CacheMismatchError(f"data.img_size={img_size} differs from {what}'s image size {spec.img_size}")
    if num_patches != spec.num_patches:
        raise CacheMismatchError(
            f"model.arch.patch_size gives {num_patches} patches per view, {what} has {spec.num_patches} "
            f"(another patch grid)")
    if attention == "topk" and k > spec.k_max:
        raise CacheMismatchError(f"targets.k={k} exceeds {what}'s k_max={spec.k_max}")
    if attention != "none" and spec.heads == 0:
        raise CacheMismatchError(f"targets.attention={attention} but {what} holds no attention target")


def check_cache_base(meta: dict, checkpoint: Optional[str]) -> None:
    """A given ``base.checkpoint`` must be the one the cache was made with (same SHA-256)."""
    recorded = (meta.get("identity", {}).get("base") or {}).get("checkpoint_sha256")
    if not checkpoint or not recorded:
        return
    if not Path(checkpoint).is_file():
        raise CacheMismatchError(f"base.checkpoint={checkpoint}: file not found (training from a cache needs no base; "
                                 "leave base.checkpoint empty or point it at the cache's base)")
    if file_sha256(checkpoint) != recorded:
        raise CacheMismatchError(f"base.checkpoint={checkpoint} is not the base model the cache was made with "
                                 f"(SHA-256 differs)")
