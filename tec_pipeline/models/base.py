"""The frozen base model: a timm ViT built from a local checkpoint, and its forward.

The forward returns what target enhancement needs (Sec. 2.3): the outputs of the
last blocks (patch tokens, before the final norm) and the pre-softmax q.k logits
of the last block, which timm's fused attention never materialises.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..config import ViTArch
from ..errors import UserError

EXPORT_FORMAT = "tec-pipeline-export"
# Entries of full SSL checkpoints that are not part of the encoder.
_IGNORED_PREFIXES = ("head.", "head_dist.", "decoder", "mask_token", "masked_embed", "fc_norm.", "dist_token")


class CheckpointError(UserError):
    """A checkpoint that cannot become this base model; one line naming the file and key."""


def build_vit(arch: ViTArch | str, **overrides) -> VisionTransformer:
    """A timm ViT without classifier head; `arch` sizes override the registered defaults."""
    if isinstance(arch, str):
        arch = ViTArch(name=arch)
    sizes = {k: v for k, v in asdict(arch).items() if k != "name" and v is not None}
    sizes.update(overrides)
    model = timm.create_model(arch.name, pretrained=False, num_classes=0, **sizes)
    if not isinstance(model, VisionTransformer) or model.num_prefix_tokens != 1 or model.cls_token is None:
        raise ValueError(f"architecture '{arch.name}': TEC needs a timm VisionTransformer with one cls token")
    return model


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _strip(sd: dict, prefixes: tuple[str, ...]) -> dict:
    """Keep the entries under the first prefix that any key has, with the prefix removed."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], str, dict]:
    """(encoder state dict, layout name, metadata) from any supported checkpoint layout.

    Layouts: MAE ``{"model": sd}``; plain timm state dict (.pth or .safetensors);
    iBOT / DINO ``{"teacher" | "state_dict": sd}`` with ``backbone.`` or
    ``module.backbone.`` prefixes; this project's export (safetensors + metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a safetensors checkpoint ({err})") from None
        layout = "tec-export" if meta.get("format") == EXPORT_FORMAT else "timm"
        return sd, layout, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a checkpoint torch.load can read safely ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: unknown checkpoint layout (a {type(obj).__name__}, not a dict)")
    if isinstance(obj.get("model"), dict):
        sd, layout = obj["model"], "mae"
    elif isinstance(obj.get("teacher"), dict):
        sd, layout = obj["teacher"], "ibot-dino"
    elif isinstance(obj.get("state_dict"), dict):
        sd, layout = obj["state_dict"], "ibot-dino"
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd, layout = obj, "timm"
    else:
        keys = ", ".join(list(obj)[:5])
        raise CheckpointError(f"{path}: unknown checkpoint layout (top-level keys: {keys})")
    sd = _strip(sd, ("module.backbone.", "backbone.", "module."))
    return sd, layout, meta


def match_state_dict(model: nn.Module, sd: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """Check `sd` against the model's parameters and buffers; error on the first bad key."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in sd:
            raise CheckpointError(f"{path}: missing encoder weight '{key}'")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: shape mismatch at '{key}': checkpoint {tuple(sd[key].shape)}, model {tuple(value.shape)}"
            )
    for key in sd:
        if key not in expected and not key.startswith(_IGNORED_PREFIXES):
            raise CheckpointError(f"{path}: unexpected weight '{key}' (architecture mismatch?)")
    return {k: sd[k] for k in expected}


def export_arch(meta: dict) -> ViTArch | None:
    """The architecture an export recorded in its metadata, if any."""
    return ViTArch(**json.loads(meta["arch"])) if "arch" in meta else None


def load_base_model(arch: ViTArch | str | None, checkpoint: str | Path | None, img_size: int | None = None) -> VisionTransformer:
    """Build the base ViT, load `checkpoint` (any supported layout), freeze it, eval mode.

    `checkpoint=None` gives a randomly initialised base (tests, smoke runs). `arch=None`
    takes the architecture recorded in a tec-pipeline export.
    """
    sd, meta = None, {}
    if checkpoint is not None:
        sd, _layout, meta = read_checkpoint(checkpoint)
    if arch is None:
        arch = export_arch(meta)
        if arch is None:
            raise CheckpointError(f"{checkpoint}: no architecture given and none recorded in the checkpoint")
    if isinstance(arch, str):
        arch = ViTArch(name=arch)
    if img_size is not None:
        arch = ViTArch(**{**asdict(arch), "img_size": img_size})
    model = build_vit(arch)
    if sd is not None:
        model.load_state_dict(match_state_dict(model, sd, checkpoint), strict=True)
    model.requires_grad_(False)
    return model.eval()


@dataclass
class BaseOutputs:
    """What the base forward hands to target enhancement."""

    features: Tensor  # Y (B, L, C): mean of the last blocks' patch tokens, before the final norm
    logits: Tensor  # A (B, H, 1+L, 1+L): pre-softmax q.k * head_dim^-0.5 of the last block


def attention_logits(attn: nn.Module, x: Tensor) -> Tensor:
    """Pre-softmax self-attention logits ``(q @ k^T) * head_dim^-0.5`` of a timm Attention.

    `x` is the block's `norm1` output; q, k come from the block's own `qkv` weights.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q @ k.transpose(-2, -1)) * attn.scale


def base_forward(vit: VisionTransformer, images: Tensor, last_layers: int = 2) -> BaseOutputs:
    """Standard ViT forward that keeps the last `last_layers` block outputs and last-block logits."""
    depth = len(vit.blocks)
    if not 1 <= last_layers <= depth:
        raise ValueError(f"last_layers={last_layers} must be within 1..{depth} (the base depth)")
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    kept = []
    for i, block in enumerate(vit.blocks):
        if i == depth - 1:
            logits = attention_logits(block.attn, block.norm1(x))
        x = block(x)
        if i >= depth - last_layers:
            kept.append(x[:, vit.num_prefix_tokens:])
    features = torch.stack(kept).mean(0)
    return BaseOutputs(features=features, logits=logits)
