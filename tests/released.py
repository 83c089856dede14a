"""Base checkpoints written as each family releases them (key names, nesting, extra entries), with
random weights at a tiny width, and a float64 ViT forward written from the papers' equations,
not from timm, to check what `load_base_model` makes of them.

`Weights` holds a pre-norm ViT in plain terms: the prefix tokens as they enter the first block
(cls first, their positions already added) and the patch positions. Each family's writer splits
that into its own tensors: where its cls position lives, whether registers get one, how it names
its blocks.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

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


# ---------------------------------------------------------------- the reference forward
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


# ---------------------------------------------------------------- the released layouts
def timm_blocks(w: Weights, layer_scale: str = "", mlp_names: tuple[str, str] = ("fc1", "fc2")) -> dict:
    """Blocks as timm, MAE, DINO, iBOT, DeiT and DINOv2 name them; layer scale as DINOv2 ("ls")
    or DeiT-III ("gamma") names it; DINOv2 ViT-g's SwiGLU is ``mlp.w12`` / ``mlp.w3``."""
    sd = {}
    for i, b in enumerate(w.blocks):
        names = {"norm1": b["ln1"], "attn.qkv": b["qkv"], "attn.proj": b["proj"], "norm2": b["ln2"],
                 f"mlp.{mlp_names[0]}": b["fc1"], f"mlp.{mlp_names[1]}": b["fc2"]}
        for name, (weight, bias) in names.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = weight, bias
        if layer_scale == "ls":
            sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = b["ls1"], b["ls2"]
        elif layer_scale == "gamma":
            sd[f"blocks.{i}.gamma_1"], sd[f"blocks.{i}.gamma_2"] = b["ls1"], b["ls2"]
    return sd


def vit_encoder(w: Weights, layer_scale: str = "", mlp_names: tuple[str, str] = ("fc1", "fc2")) -> dict:
    """cls_token (1, 1, C), pos_embed (1, positioned + L, C), patch_embed, blocks, norm."""
    sd = {"cls_token": w.tokens[None, :1], "pos_embed": torch.cat([w.token_pos[:w.positioned], w.pos])[None],
          "patch_embed.proj.weight": w.patch_w, "patch_embed.proj.bias": w.patch_b,
          **timm_blocks(w, layer_scale, mlp_names), "norm.weight": w.norm[0], "norm.bias": w.norm[1]}
    return sd


def training_extras(epoch: int) -> dict:
    """What MAE / DINO / DeiT / TEC training loops save beside the weights, `args` a Namespace."""
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05, "params": [0, 1]}]},
            "epoch": epoch, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
            "args": argparse.Namespace(model="vit_base_patch16", batch_size=64, blr=1.5e-4, mask_ratio=0.75,
                                       norm_pix_loss=True, output_dir="./output_dir", world_size=8)}


def mae_decoder(dim: int = 16) -> dict:
    """MAE's decoder (and its mask token), saved with the encoder in a training checkpoint."""
    return {"mask_token": torch.zeros(1, 1, dim), "decoder_embed.weight": torch.zeros(dim, C),
            "decoder_embed.bias": torch.zeros(dim), "decoder_pos_embed": torch.zeros(1, 197, dim),
            "decoder_blocks.0.norm1.weight": torch.ones(dim), "decoder_norm.weight": torch.ones(dim),
            "decoder_pred.weight": torch.zeros(768, dim), "decoder_pred.bias": torch.zeros(768)}


def dino_training(w: Weights, loss: str) -> dict:
    """DINO / iBOT ``checkpoint.pth``: the DDP student, the teacher (not DDP-wrapped for a ViT), heads."""
    backbone = vit_encoder(w)
    if loss == "ibot_loss":
        backbone["masked_embed"] = torch.zeros(1, C)
    head = {"head.mlp.0.weight": torch.zeros(64, C), "head.last_layer.weight_g": torch.ones(128, 1)}
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in backbone.items()}
    return {"student": {**student, **{f"module.{k}": v for k, v in head.items()}},
            "teacher": {**{f"backbone.{k}": v for k, v in backbone.items()}, **head},
            **training_extras(100), loss: {"center": torch.zeros(1, 128)}, "fp16_scaler": {"scale": 1024.0}}


def dinov2(w: Weights, mlp_names: tuple[str, str] = ("fc1", "fc2")) -> dict:
    """``dinov2_vit*14(_reg4)_pretrain.pth``: flat; mask_token (1, C); registers without a position."""
    sd = {**vit_encoder(w, "ls", mlp_names), "mask_token": torch.zeros(1, C)}
    if len(w.tokens) > 1:
        sd["register_tokens"] = w.tokens[None, 1:]
    return sd


def deit(w: Weights) -> dict:
    """DeiT ``{"model": ...}`` with the classifier head; distilled: dist_token (positioned) and head_dist."""
    sd = {**vit_encoder(w), "head.weight": torch.zeros(10, C), "head.bias": torch.zeros(10)}
    if len(w.tokens) > 1:
        sd.update({"dist_token": w.tokens[None, 1:2], "head_dist.weight": torch.zeros(10, C),
                   "head_dist.bias": torch.zeros(10)})
    return {"model": sd}


def deit3(w: Weights) -> dict:
    """DeiT-III ``deit_3_*.pth``: layer scale ``gamma_1`` / ``gamma_2``, patch positions only."""
    sd = {**vit_encoder(w, "gamma"), "head.weight": torch.zeros(10, C), "head.bias": torch.zeros(10)}
    sd["pos_embed"] = w.pos[None]
    return {"model": sd}


def open_clip(w: Weights, prefix: str = "") -> dict:
    """OpenCLIP's state dict: the vision tower under ``visual.`` in OpenAI's naming, and the text tower."""
    sd = {"visual.class_embedding": w.tokens[0], "visual.positional_embedding": torch.cat([w.token_pos[:1], w.pos]),
          "visual.conv1.weight": w.patch_w, "visual.ln_pre.weight": w.pre_norm[0], "visual.ln_pre.bias": w.pre_norm[1],
          "visual.ln_post.weight": w.norm[0], "visual.ln_post.bias": w.norm[1], "visual.proj": torch.zeros(C, 16)}
    for i, b in enumerate(w.blocks):
        p = f"visual.transformer.resblocks.{i}."
        names = {"ln_1": b["ln1"], "attn.out_proj": b["proj"], "ln_2": b["ln2"], "mlp.c_fc": b["fc1"],
                 "mlp.c_proj": b["fc2"]}
        for name, (weight, bias) in names.items():
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = weight, bias
        sd[f"{p}attn.in_proj_weight"], sd[f"{p}attn.in_proj_bias"] = b["qkv"]
    text = {"token_embedding.weight": torch.zeros(100, 16), "positional_embedding": torch.zeros(77, 16),
            "transformer.resblocks.0.ln_1.weight": torch.ones(16), "ln_final.weight": torch.ones(16),
            "text_projection": torch.zeros(16, 16), "logit_scale": torch.tensor(4.6)}
    return {f"{prefix}{k}": v for k, v in {**sd, **text}.items()}


@torch.no_grad()
def tec_raw(w: Weights) -> tuple[dict, Weights]:
    """The authors' TECViT under ``model``: encoder, ``cls_token_mlp`` (T' = MLP(T)), encoder adaptors
    and decoders. Returns the file and the weights the encoder sees (cls = MLP(T), by hand)."""
    g = torch.Generator().manual_seed(7)
    fc1_w, fc1_b = torch.randn(4 * C, C, generator=g) * 0.2, torch.randn(4 * C, generator=g) * 0.2
    fc2_w, fc2_b = torch.randn(C, 4 * C, generator=g) * 0.2, torch.randn(C, generator=g) * 0.2
    t = w.tokens[0].double()
    h = t @ fc1_w.double().T + fc1_b.double()
    seen = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ fc2_w.double().T + fc2_b.double()
    model = {**vit_encoder(w), "cls_token_mlp.fc1.weight": fc1_w, "cls_token_mlp.fc1.bias": fc1_b,
             "cls_token_mlp.fc2.weight": fc2_w, "cls_token_mlp.fc2.bias": fc2_b,
             "encoder_adaptor.0.fc.weight": torch.zeros(C, 3 * C), "encoder_adaptor.norm.weight": torch.ones(C),
             **mae_decoder(), "decoder_pred_attn.weight": torch.zeros(2 * C, 16)}
    return {"model": model, **training_extras(299)}, replace(w, tokens=seen.float()[None])


def tec_converted(w: Weights) -> dict:
    """The authors' TEC converted for fine-tuning: cls token folded, no final norm (global pooling)."""
    sd = {k: v for k, v in vit_encoder(w).items() if not k.startswith("norm.")}
    return {"model": sd}


def ijepa(w: Weights) -> dict:
    """I-JEPA ``*.pth.tar``: DDP encoder, predictor and EMA target encoder, no cls token."""
    sd = {k: v for k, v in vit_encoder(w).items() if k != "cls_token"}
    sd["pos_embed"] = w.pos[None]
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    return {"encoder": wrapped, "predictor": {"module.predictor_embed.weight": torch.zeros(16, C)},
            "target_encoder": wrapped, "opt": {"state": {}, "param_groups": []}, "scaler": None, "epoch": 300,
            "loss": 0.1, "batch_size": 2048, "world_size": 16, "lr": 1e-3}


def beit(w: Weights) -> dict:
    """BEiT ``{"model": ...}``: a shared relative position bias, q / v biases, no absolute positions."""
    sd = {k: v for k, v in vit_encoder(w).items() if k != "pos_embed"}
    sd.update({"rel_pos_bias.relative_position_bias_table": torch.zeros(732, HEADS),
               "rel_pos_bias.relative_position_index": torch.zeros(197, 197, dtype=torch.long)})
    return {"model": sd}


@dataclass(frozen=True)
class Family:
    """One row of README "Loading a base model": how its file is laid out and what timm calls it."""

    file: str  # as released
    arch: str  # base.arch.name
    native: int  # the released pos_embed's image size
    layout: Callable[[Weights], object]  # -> the object the file holds (or (object, weights seen))
    weights: dict  # `draw` arguments: patch, grid, prefix tokens, ...
    timm_reads: bool = True  # timm's own loader (create_model with a file) reads the file as is
    eps: float = 1e-6  # LayerNorm eps (CLIP: torch's default)


P16, P14 = {"patch": 16, "grid": 14}, {"patch": 14, "grid": 37}  # 224 px at patch 16, 518 px at patch 14
CLIP = {**P16, "pre_norm": True, "patch_bias": False}
FAMILIES = {
    "mae": Family("mae_pretrain_vit_base.pth", "vit_base_patch16_224", 224, lambda w: {"model": vit_encoder(w)}, P16),
    "mae_training": Family("checkpoint-799.pth", "vit_base_patch16_224", 224,
                           lambda w: {"model": {**vit_encoder(w), **mae_decoder()}, **training_extras(799)}, P16,
                           timm_reads=False),
    "dino": Family("dino_vitbase16_pretrain.pth", "vit_base_patch16_224", 224, vit_encoder, P16),
    "dino_training": Family("checkpoint.pth", "vit_base_patch16_224", 224, lambda w: dino_training(w, "dino_loss"),
                            P16, timm_reads=False),
    "ibot_training": Family("checkpoint.pth", "vit_base_patch16_224", 224, lambda w: dino_training(w, "ibot_loss"),
                            P16, timm_reads=False),
    "ibot_teacher": Family("checkpoint_teacher.pth", "vit_base_patch16_224", 224,
                           lambda w: {"state_dict": {**vit_encoder(w), "masked_embed": torch.zeros(1, C)}}, P16,
                           timm_reads=False),
    "dinov2": Family("dinov2_vits14_pretrain.pth", "vit_small_patch14_dinov2", 518, dinov2,
                     {**P14, "layer_scale": True}),
    "dinov2_reg": Family("dinov2_vits14_reg4_pretrain.pth", "vit_small_patch14_reg4_dinov2", 518, dinov2,
                         {**P14, "layer_scale": True, "prefix": 5}),
    "dinov2_g": Family("dinov2_vitg14_pretrain.pth", "vit_giant_patch14_dinov2", 518,
                       lambda w: dinov2(w, ("w12", "w3")), {**P14, "layer_scale": True, "act": "swiglu"}),
    "deit": Family("deit_base_patch16_224-b5f2ef4d.pth", "deit_base_patch16_224", 224, deit, P16),
    "deit_distilled": Family("deit_base_distilled_patch16_224-df68dfff.pth", "deit_base_distilled_patch16_224", 224,
                             deit, {**P16, "prefix": 2, "positioned": 2}),
    "deit3": Family("deit_3_base_224_1k.pth", "deit3_base_patch16_224", 224, deit3,
                    {**P16, "positioned": 0, "layer_scale": True}),
    "openclip": Family("open_clip_pytorch_model.bin", "vit_base_patch16_clip_quickgelu_224", 224, open_clip,
                       {**CLIP, "act": "quick_gelu"}, eps=1e-5),
    "openclip_training": Family("epoch_32.pt", "vit_base_patch16_clip_224", 224,
                                lambda w: {"epoch": 32, "name": "laion", "state_dict": open_clip(w, "module."),
                                           "optimizer": {"state": {}, "param_groups": []}}, CLIP, eps=1e-5),
    "tec_raw": Family("checkpoint-299.pth", "vit_base_patch16_224", 224, tec_raw, P16,
                      timm_reads=False),
    "tec_converted": Family("tec_converted.pth", "vit_base_patch16_224", 224,
                            tec_converted, P16, timm_reads=False),
}


def write(family: Family, folder, seed: int = 0, edit: Callable[[object], object] = lambda obj: obj):
    """Write `family`'s file (after `edit`) under `folder`; returns (path, the weights its encoder has)."""
    w = draw(**family.weights, seed=seed)
    obj = family.layout(w)
    if isinstance(obj, tuple):
        obj, w = obj
    path = folder / family.file
    torch.save(edit(obj), path)
    return path, w
