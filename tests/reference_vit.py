"""A pre-norm ViT written from the papers' equations in float64, not from timm: the reference the
base families' targets are checked against (`tests/test_base_families.py`), and Sec. 2.3's target
selection written the obvious way for any number of prefix tokens.

`Weights` holds the ViT in plain terms: the prefix tokens as released (cls first, then registers
or a distillation token), their positions, and the patch positions; each family's writer in
`released.py` splits that into its own tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tec_pipeline.targets import patch_normalize

C, HEADS = 32, 2


@dataclass(frozen=True)
class Weights:
    patch: int
    patch_w: Tensor  # (C, 3, p, p)
    patch_b: Optional[Tensor]  # (C,), None where the family's patch conv has no bias (CLIP)
    tokens: Tensor  # (P, C) prefix tokens as released: cls, then registers / a distillation token
    token_pos: Tensor  # (P, C) their positions: the first `positioned` tokens have one, the rest zeros
    positioned: int
    pos: Tensor  # (L, C) patch positions at the released grid
    pre_norm: Optional[tuple[Tensor, Tensor]]  # CLIP's ln_pre
    blocks: list[dict]  # ln1, qkv, proj, ls1, ln2, fc1, fc2, ls2: (weight, bias) pairs or a gamma
    norm: tuple[Tensor, Tensor]
    act: str  # gelu | quick_gelu | swiglu


def draw(patch: int, grid: int, prefix: int = 1, positioned: int = 1, depth: int = 2, act: str = "gelu",
         layer_scale: bool = False, pre_norm: bool = False, patch_bias: bool = True, seed: int = 0) -> Weights:
    """Random weights, scaled so that attention is neither uniform nor one-hot; `positioned` of the
    `prefix` tokens get a position (MAE: the cls token; DeiT distilled: both; DeiT-III: none)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln():
        return 1 + randn(C, scale=0.1), randn(C, scale=0.1)

    hidden = 85 if act == "swiglu" else 4 * C  # timm's SwiGLU for DINOv2 ViT-g: 2 * 85 packed
    fc1_out = 2 * hidden if act == "swiglu" else hidden
    blocks = [{"ln1": ln(), "qkv": (randn(3 * C, C), randn(3 * C)), "proj": (randn(C, C), randn(C)),
               "ln2": ln(), "fc1": (randn(fc1_out, C), randn(fc1_out)), "fc2": (randn(C, hidden), randn(C)),
               "ls1": 0.5 + randn(C) if layer_scale else None, "ls2": 0.5 + randn(C) if layer_scale else None}
              for _ in range(depth)]
    token_pos = randn(prefix, C)
    token_pos[positioned:] = 0
    return Weights(patch, randn(C, 3, patch, patch, scale=0.05), randn(C) if patch_bias else None,
                   randn(prefix, C, scale=1.0), token_pos, positioned, randn(grid * grid, C),
                   ln() if pre_norm else None, blocks, ln(), act)


def layer_norm(x: Tensor, wb: tuple[Tensor, Tensor], eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * wb[0].double() + wb[1].double()


def linear(x: Tensor, wb: tuple[Tensor, Tensor]) -> Tensor:
    return x @ wb[0].double().T + wb[1].double()


def mlp(x: Tensor, block: dict, act: str) -> Tensor:
    h = linear(x, block["fc1"])
    if act == "swiglu":  # DINOv2 ViT-g: w12 -> (x1, x2), silu(x1) * x2, w3
        x1, x2 = h.chunk(2, dim=-1)
        h = F.silu(x1) * x2
    elif act == "quick_gelu":  # OpenAI CLIP
        h = h * torch.sigmoid(1.702 * h)
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return linear(h, block["fc2"])


def reference_forward(w: Weights, images: Tensor, eps: float, last_layers: int = 2) -> tuple[Tensor, Tensor]:
    """(mean of the last blocks' patch tokens (B, L, C), last-block logits over all tokens (B, H, N, N))."""
    x = F.conv2d(images.double(), w.patch_w.double(), None if w.patch_b is None else w.patch_b.double(),
                 stride=w.patch).flatten(2).transpose(1, 2) + w.pos.double()
    prefix = (w.tokens + w.token_pos).double()
    x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
    if w.pre_norm is not None:
        x = layer_norm(x, w.pre_norm, 1e-5)
    B, N, _ = x.shape
    outs = []
    for block in w.blocks:
        q, k, v = linear(layer_norm(x, block["ln1"], eps), block["qkv"]).reshape(B, N, 3, HEADS, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-2, -1) / math.sqrt(C // HEADS)
        a = linear((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C), block["proj"])
        x = x + (a * block["ls1"].double() if block["ls1"] is not None else a)
        m = mlp(layer_norm(x, block["ln2"], eps), block, w.act)
        x = x + (m * block["ls2"].double() if block["ls2"] is not None else m)
        outs.append(x)
    return torch.stack(outs[-last_layers:]).mean(0)[:, len(w.tokens):], logits


def reference_targets(features: Tensor, logits: Tensor, prefix: int, k: int) -> dict:
    """Sec. 2.3 written the obvious way for `prefix` prefix tokens (cls first): rank patches by the
    head-mean cls row over patch keys; rows [cls; top-k], keys the patches, no other prefix token."""
    B, H, N, _ = logits.shape
    L = N - prefix
    feat, attn, topk = patch_normalize(features)[0], [], []
    for b in range(B):
        score = [sum(logits[b, h, 0, prefix + j].item() for h in range(H)) / H for j in range(L)]
        order = sorted(range(L), key=lambda j: -score[j])[:k]
        rows = [0] + [prefix + j for j in order]
        attn.append(torch.stack([logits[b, :, row, prefix:] for row in rows]))  # (k+1, H, L)
        topk.append(order)
    return {"feat": feat, "attn": torch.stack(attn), "topk_idx": torch.tensor(topk)}
