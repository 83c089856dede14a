"""Base checkpoints written as each family releases them (key names, nesting, extra entries such as
``optimizer``, ``epoch`` and an ``args`` Namespace, prefixes, 518-px positions), with random
weights at a tiny width (`reference_vit.draw`). Each writer states the layout it follows.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from reference_vit import C, HEADS, Weights, draw


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
             **tec_adapters_and_decoders()}
    return {"model": model, **training_extras(299)}, replace(w, tokens=seen.float()[None])


def tec_adapters_and_decoders(dim: int = 16) -> dict:
    """What TECViT saves beside its encoder (sail-sg/TEC ``models_tec_vit.py`` module names): the
    encoder adaptor, the feature and attention decoder branches, the shared decoder blocks."""
    return {"encoder_adaptor.adap_before.weight": torch.ones(3 * C), "encoder_adaptor.fuse_fcs.0.weight":
            torch.zeros(C, 3 * C), "encoder_adaptor.adap_mlps.0.fc1.weight": torch.zeros(4 * dim, C),
            "encoder_adaptor.adap_after.weight": torch.ones(C),
            "forward_fea_decoder.decoder_embed.weight": torch.zeros(dim, C),
            "forward_fea_decoder.mask_token": torch.zeros(1, 1, dim),
            "forward_fea_decoder.decoder_norm.weight": torch.ones(dim),
            "forward_fea_decoder.decoder_pred.weight": torch.zeros(C, dim),
            "forward_att_decoder.decoder_embed.weight": torch.zeros(dim, C),
            "forward_att_decoder.mask_token": torch.zeros(1, 1, dim),
            "forward_att_decoder.decoder_qk.weight": torch.zeros(2 * C, dim),
            "decoder_blocks.0.norm1.weight": torch.ones(dim), "decoder_pos_embed": torch.zeros(1, 197, dim)}


def tec_converted(w: Weights) -> dict:
    """The authors' TEC converted for fine-tuning (their ``weight_convert.py``): the global-pool
    ViT's state dict saved flat, cls token folded, no final norm, head and fc_norm removed."""
    return {k: v for k, v in vit_encoder(w).items() if not k.startswith("norm.")}


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
    """One base family: how its file is laid out and what timm calls it."""

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
