"""Every base family of `released.FAMILIES`: its released file layout (random weights, tiny width)
loads, and its targets equal a float64 forward written from the papers' equations and, where timm
reads the file itself, timm's own model at another image size; each bad case is one line."""
from __future__ import annotations

import pathlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from helpers import TINY_MODEL_ARGS, write_images
from reference_vit import draw, reference_forward, reference_targets
from released import FAMILIES, beit, ijepa, write
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.train import run_train
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.base_targets import compute_targets
from tec_pipeline.cache.store import open_cache
from tec_pipeline.config import ViTArch, load_config
from tec_pipeline.export import export_model
from tec_pipeline.models.base import CheckpointError, UnsupportedBase, build_base_vit, build_vit, load_base_model
from tec_pipeline.models.tec import TECModel
from tec_pipeline.train.model import init_from_base

K = 5
SIZES = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def arch_of(family, **overrides) -> ViTArch:
    return ViTArch(family.arch, **{**SIZES, **overrides})


def assert_same_targets(got, ref, atol=1e-4):
    torch.testing.assert_close(got.feat.double(), ref["feat"], atol=atol, rtol=1e-4)
    torch.testing.assert_close(got.attn.double(), ref["attn"], atol=atol, rtol=1e-4)
    assert torch.equal(got.topk_idx, ref["topk_idx"])


@pytest.mark.parametrize("name", FAMILIES)
def test_targets_equal_a_hand_written_forward_at_the_released_size(name, tmp_path):
    family = FAMILIES[name]
    path, w = write(family, tmp_path)
    base = load_base_model(arch_of(family), path, img_size=family.native)
    images = torch.randn(2, 3, family.native, family.native, generator=torch.Generator().manual_seed(1))
    features, logits = reference_forward(w, images, family.eps)
    assert_same_targets(compute_targets(base, images, 2, K), reference_targets(features, logits, len(w.tokens), K))


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.timm_reads])
def test_targets_equal_timms_own_loader_at_another_size(name, tmp_path):
    """timm's `create_model(pretrained=True)` on the file: its reader, its conversion, its pos-embed resampling."""
    family = FAMILIES[name]
    path, _ = write(family, tmp_path)
    size = 56 if family.weights["patch"] == 14 else 64  # a 4 x 4 grid, from 37 x 37 or 14 x 14
    ours = load_base_model(arch_of(family), path, img_size=size)
    theirs = timm.create_model(family.arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                               num_classes=0, img_size=size, **SIZES).eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    got, ref = compute_targets(ours, images, 2, K), compute_targets(theirs, images, 2, K)
    assert ours.patch_embed.grid_size == (4, 4)
    assert_same_targets(got, {"feat": ref.feat.double(), "attn": ref.attn.double(), "topk_idx": ref.topk_idx},
                        atol=1e-6)


def _entries(obj):
    """The state dicts a file holds (a training checkpoint holds several: student and teacher)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return [obj]
    return [v for v in obj.values() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor)
                                                                       for t in v.values())]


def _drop_last_mlp_weight(obj):
    for sd in _entries(obj):
        for key in [k for k in sd if k.endswith(("blocks.1.mlp.fc2.weight", "blocks.1.mlp.w3.weight",
                                                 "resblocks.1.mlp.c_proj.weight"))]:
            del sd[key]
    return obj


def _not_a_namespace(obj):
    return {**obj, "args": pathlib.PurePosixPath("/datasets/imagenet")}


BAD = {
    "missing": (_drop_last_mlp_weight, {}, "missing encoder weight 'blocks.1.mlp.fc2.weight'"),
    "patch": (lambda obj: obj, {"patch_size": 8}, "patch size {patch} in the checkpoint, 8 in base.arch"),
    "pickle": (_not_a_namespace, {}, "it pickles pathlib.PurePosixPath"),
}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", FAMILIES)
def test_bad_checkpoint_of_each_family_is_one_line(name, bad, tmp_path):
    family = FAMILIES[name]
    edit, overrides, expected = BAD[bad]
    path, _ = write(family, tmp_path, edit=edit)
    with pytest.raises(CheckpointError) as info:
        load_base_model(arch_of(family, **overrides), path, img_size=family.native)
    message = str(info.value)
    assert expected.format(patch=family.weights["patch"]) in message and str(path) in message and "\n" not in message


def test_a_student_is_read_where_no_teacher_is_saved(tmp_path):
    def student_only(obj):
        student = {f"module.{k}": v for k, v in obj.pop("teacher").items()}  # DDP-wrapped, as saved
        return {**obj, "student": student}

    family = FAMILIES["dino_training"]
    path, w = write(family, tmp_path, edit=student_only)
    base = load_base_model(arch_of(family), path)
    images = torch.randn(2, 3, 224, 224)
    features, logits = reference_forward(w, images, family.eps)
    assert_same_targets(compute_targets(base, images, 2, K), reference_targets(features, logits, 1, K))


@pytest.mark.parametrize("name, arch, expected", [
    ("dinov2_reg", "vit_small_patch14_dinov2", "4 register tokens in the checkpoint, 0 in base.arch"),
    ("dinov2", "vit_small_patch14_reg4_dinov2", "0 register tokens in the checkpoint, 4 in base.arch"),
    ("deit_distilled", "deit_base_patch16_224", "a distillation token in the checkpoint, none in base.arch"),
    ("deit", "deit_base_distilled_patch16_224", "no distillation token in the checkpoint, one in base.arch"),
])
def test_prefix_tokens_must_match_the_architecture(name, arch, expected, tmp_path):
    family = FAMILIES[name]
    path, _ = write(family, tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        load_base_model(replace(arch_of(family), name=arch), path, img_size=family.native)


@pytest.mark.parametrize("arch, reason", [
    ("beit_base_patch16_224", "relative position bias"),
    ("vit_base_patch16_siglip_224", "global_pool='map'"),
    ("vit_medium_patch16_gap_256", "no cls token"),
    ("vit_relpos_base_patch16_clsgap_224", "not a timm VisionTransformer"),
])
def test_architecture_the_method_cannot_serve_is_refused(arch, reason):
    with pytest.raises(UnsupportedBase) as info:
        load_base_model(ViTArch(arch, **SIZES), None)
    assert reason in str(info.value) and f"base.arch.name='{arch}'" in str(info.value)


@pytest.mark.parametrize("layout, reason", [(beit, "relative position bias (BEiT)"), (ijepa, "no cls token (I-JEPA")])
def test_checkpoint_the_method_cannot_serve_is_refused(layout, reason, tmp_path):
    path = tmp_path / "base.pth"
    torch.save(layout(draw(16, 14)), path)
    with pytest.raises(CheckpointError) as info:
        load_base_model(ViTArch("vit_base_patch16_224", **SIZES), path)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_openai_clip_torchscript_archive_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    with pytest.warns(Warning):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError) as info, pytest.warns(UserWarning):
        load_base_model(ViTArch("vit_base_patch16_clip_quickgelu_224", **SIZES), path)
    assert "TorchScript archive" in str(info.value) and "state_dict()" in str(info.value)


def test_base_without_final_norm_serves_targets_and_refuses_other_uses(tmp_path):
    """The authors' converted TEC has no `norm.*`: targets come before the final norm; an
    evaluation (forward_features) or Tab. 6d's init say in one line that the norm is missing."""
    family = FAMILIES["tec_converted"]
    path, _ = write(family, tmp_path)
    base = load_base_model(arch_of(family), path)
    compute_targets(base, torch.randn(1, 3, 224, 224), 2, K)
    with pytest.raises(CheckpointError, match="has no final norm") as info:
        base.forward_features(torch.randn(1, 3, 224, 224))
    assert "\n" not in str(info.value)
    model = TECModel(arch_of(family, img_size=224), feat_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                     encoder_adapter=False)
    norm = model.encoder.norm.weight.clone()
    with pytest.warns(UserWarning, match="has no final norm; the new encoder's norm keeps its initialisation"):
        assert init_from_base(model, base, str(path)) > 0
    assert torch.equal(model.encoder.norm.weight, norm)


def test_a_tec_pipeline_run_checkpoint_loads_as_its_export(tmp_path):
    """checkpoint.pt holds the whole TECModel: its encoder with the input adapter folded is the export."""
    arch = ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=8, **SIZES)
    torch.manual_seed(0)
    model = TECModel(arch, feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                     adapter_group=1)
    torch.save({"model": model.state_dict(), "step": 3, "model_kwargs": {"feat_dim": 32}}, tmp_path / "checkpoint.pt")
    export = export_model(model, arch, tmp_path / "encoder.safetensors")
    images = torch.randn(2, 3, 32, 32)
    got = compute_targets(load_base_model(arch, tmp_path / "checkpoint.pt"), images, 2, K)
    ref = compute_targets(load_base_model(None, export), images, 2, K)
    assert_same_targets(got, {"feat": ref.feat.double(), "attn": ref.attn.double(), "topk_idx": ref.topk_idx},
                        atol=1e-6)
    assert not torch.equal(model.encoder.cls_token, model.cls_token())  # the fold did something


@pytest.mark.parametrize("name, size, init_from_base", [("dinov2_reg", 56, False), ("tec_raw", 64, True)])
def test_cache_targets_then_train_from_a_released_layout(name, size, init_from_base, tmp_path):
    """Stage one (then `verify`, which recomputes views) and stage two on a tiny image folder,
    with a DINOv2-with-registers base (518-px positions, resampled) and the authors' raw TEC."""
    family = FAMILIES[name]
    path, _ = write(family, tmp_path)
    images = write_images(tmp_path / "images", 8, classes=2)
    patch = family.weights["patch"]
    overrides = [f"base.arch.name={family.arch}", "base.arch.embed_dim=32", "base.arch.depth=2",
                 "base.arch.num_heads=2", f"base.checkpoint={path}", f"data.path={images}", f"data.img_size={size}",
                 "data.views=2", "data.batch_size=4", "data.num_workers=0", "cache.images_per_shard=4",
                 "cache.k_max=4", f"cache.path={tmp_path / 'cache.zarr'}", "targets.k=3",
                 f"output={tmp_path / 'run'}", *[a for a in TINY_MODEL_ARGS if not a.startswith("data.img_size")],
                 f"model.arch.img_size={size}", f"model.arch.patch_size={patch}", "model.arch.depth=2",
                 "model.adapter_group=1", f"model.init_from_base={str(init_from_base).lower()}"]
    cfg = load_config(None, overrides)
    run_cache_targets(cfg)
    assert verify_cache(cfg.cache.path, sample=4)
    meta = open_cache(cfg.cache.path).meta
    assert (meta["num_patches"], meta["feat_dim"]) == ((size // patch) ** 2, 32)
    result = run_train(cfg)
    assert result["step"] == 2 and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert result["losses"] and all(np.isfinite(v) for v in result["losses"].values())


CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/vit*_in1k.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_base_config_names_a_base_that_serves_its_grid_and_k(path):
    """Its base arch builds and can serve, the image size is a whole patch grid shared with the new
    model, and the cache stores the rows targets.k reads (one block: the sizes are what counts)."""
    cfg = load_config(path)
    base = build_base_vit(replace(cfg.base.arch, img_size=cfg.data.img_size, depth=1))
    new = build_vit(replace(cfg.model.arch, img_size=cfg.data.img_size, depth=1))
    assert cfg.data.img_size % base.patch_embed.patch_size[0] == 0
    assert new.patch_embed.grid_size == base.patch_embed.grid_size
    assert cfg.targets.k <= cfg.cache.k_max <= base.patch_embed.num_patches
