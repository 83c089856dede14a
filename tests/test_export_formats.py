"""Exports other fine-tuning code reads: `--format timm` (timm strictly, and as timm's train.py
--pretrained-path loads it) and `--format mae` (MAE's {"model": state_dict}), read back by our loader."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import timm
import torch
from safetensors.torch import load_file

import test_export
from tec_pipeline.errors import UserError
from tec_pipeline.export import export_run
from tec_pipeline.models.base import load_base_model

NEW = test_export.NEW
run = test_export.run  # test_export's short TEC training run, a module fixture

MAE_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.bias",
            "norm.weight")


def sizes(arch) -> dict:
    return {k: v for k, v in asdict(arch).items() if k != "name"}


def test_both_formats_load_and_give_the_same_encoder(run):
    timm_path, mae_path = export_run(run, fmt="timm"), export_run(run, fmt="mae")
    assert (timm_path.name, mae_path.name) == ("encoder.safetensors", "encoder_mae.pth")
    vit = timm.create_model(NEW.name, pretrained=False, num_classes=0, **sizes(NEW))
    vit.load_state_dict(load_file(str(timm_path)), strict=True)  # timm, strictly
    mae = torch.load(mae_path, map_location="cpu", weights_only=True)
    assert set(mae) == {"model"} and all(k in mae["model"] for k in MAE_KEYS)
    assert mae["model"]["pos_embed"].shape == (1, 1 + 16, NEW.embed_dim)  # the cls position included, as MAE's
    from_mae, from_timm = load_base_model(NEW, mae_path), load_base_model(None, timm_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b, c = from_mae.forward_features(images), from_timm.forward_features(images), vit.eval().forward_features(images)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_timm_train_py_pretrained_path_loads_the_export(run):
    """What timm's `train.py --pretrained-path` does: the file as pretrained weights (overlay
    num_classes=-1, so the missing head is tolerated), a fresh head and fc_norm under avg pooling."""
    path = export_run(run)
    vit = timm.create_model(NEW.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=-1),
                            num_classes=10, global_pool="avg", **sizes(NEW))
    weights = load_file(str(path))
    assert torch.equal(vit.blocks[1].attn.qkv.weight, weights["blocks.1.attn.qkv.weight"])
    assert torch.equal(vit.cls_token, weights["cls_token"]) and vit.head.out_features == 10


def test_unknown_format_is_one_line(run):
    with pytest.raises(UserError, match="--format onnx: expected one of timm, mae"):
        export_run(run, fmt="onnx")
