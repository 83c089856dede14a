"""The frozen base model's side of both stages: load it, choose its precision, run it on views and
enhance its outputs into targets.

`targets` holds the enhancement itself (pure functions of the base's outputs); this module is
where the base forward meets it, so `targets` never imports a model.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
from torch import Tensor

from .config import ViTArch
from .errors import UserError
from .models.base import base_forward, file_sha256, load_base_model
from .targets import Targets, enhance
from .views import normalize


def load_base(arch: ViTArch, checkpoint: Optional[str], img_size: int, seed: int):
    """The frozen base ViT; a random-init base (no checkpoint) is seeded so reruns agree."""
    if checkpoint is None:
        torch.manual_seed(seed)
    try:
        return load_base_model(arch, checkpoint, img_size=img_size)
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError) as err:  # timm: unknown name or bad sizes
        reason = " ".join(str(err).split())
        raise UserError(f"base.arch.name='{arch.name}': cannot build this ViT ({reason})") from None


def weights_sha256(base) -> str:
    """SHA-256 of the parameters themselves: identifies a random-init base."""
    h = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_sha256(checkpoint: Optional[str], base) -> str:
    """What identifies the base's weights: its checkpoint file's SHA-256, or its parameters'."""
    return file_sha256(checkpoint) if checkpoint else "random-init:" + weights_sha256(base)


COMPUTE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}  # base.compute_dtype


def compute_setting(setting: str, device: torch.device) -> str:
    """``base.compute_dtype`` resolved on `device`: ``auto`` is fp16 on CUDA (the authors run
    their frozen base under fp16 autocast: with more mantissa bits than bf16 it stays closer to
    fp32, so the top-k patch selection follows fp32's) and fp32 on a CPU (exact; fp16 / bf16
    autocast there only when asked)."""
    if setting == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return setting


def compute_dtype(setting: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved ``base.compute_dtype`` (None: fp32, no autocast)."""
    return COMPUTE_DTYPES[setting]


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """The name a cache records for its compute precision ("float32" when autocast is off)."""
    return str(dtype).removeprefix("torch.") if dtype else "float32"


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype a cache's recorded precision names (None: float32 or not recorded)."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name or "float32")


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Autocast to `dtype` on `device`; no autocast (fp32) when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


@torch.no_grad()
def compute_targets(base, images: Tensor, last_layers: int = 2, k: int = 15) -> Targets:
    """Base forward on normalized `images` (B, 3, S, S) -> patch-normalized features (Eq. 2) and
    the top-k attention target (Sec. 2.3)."""
    out = base_forward(base, images, last_layers)
    return enhance(out.features, out.queries, out.keys, k)


def view_targets(base, views: Tensor, last_layers: int, k_max: int, device: torch.device,
                 dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """Stage one's forward: uint8 views (B, V, 3, S, S) -> targets **on `device`** with leading
    (B, V): float32 feat, feat_mean, feat_std, attn and int64 topk_idx (encoded there next,
    ``cache.encode``, so only storage-dtype bytes reach the host)."""
    B, V = views.shape[:2]
    x = views.flatten(0, 1).to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, dtype):
        t = compute_targets(base, normalize(x), last_layers, k_max)
    out = {name: getattr(t, name).float() for name in ("feat", "feat_mean", "feat_std", "attn")}
    out["topk_idx"] = t.topk_idx
    return {name: v.view(B, V, *v.shape[1:]) for name, v in out.items()}
