"""Base model loading: every checkpoint layout round-trips; every bad checkpoint is one clear error."""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from helpers import TINY_BASE
from tec_pipeline.config import ViTArch
from tec_pipeline.models.base import EXPORT_FORMAT, CheckpointError, build_vit, load_base_model, read_checkpoint


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    model = build_vit(TINY_BASE).eval()
    with torch.no_grad():  # random weights everywhere, so a key left at init would show
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(path, obj):
    torch.save(obj, path)
    return path


LAYOUTS = {
    "mae": lambda sd, d: _save(d / "mae.pth", {"model": {**sd, "decoder_embed.weight": torch.zeros(4, 32),
                                                        "mask_token": torch.zeros(1, 1, 4)}, "epoch": 3}),
    "timm_pth": lambda sd, d: _save(d / "timm.pth", {**sd, "head.weight": torch.zeros(10, 32)}),
    "timm_safetensors": lambda sd, d: (save_file(sd, d / "timm.safetensors"), d / "timm.safetensors")[1],
    "ibot_teacher": lambda sd, d: _save(d / "ibot.pth", {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                                                     "backbone.masked_embed": torch.zeros(32),
                                                                     "head.mlp.0.weight": torch.zeros(8, 32)}}),
    "dino_teacher": lambda sd, d: _save(d / "dino.pth", {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}}),
    "state_dict": lambda sd, d: _save(d / "sd.pth", {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_round_trips(layout, source, tmp_path):
    path = LAYOUTS[layout](_sd(source), tmp_path)
    model = load_base_model(TINY_BASE, path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), source.forward_features(x), atol=0, rtol=0)


def test_own_export_loads_without_arch(source, tmp_path):
    path = tmp_path / "export.safetensors"
    save_file(_sd(source), path, metadata={"format": EXPORT_FORMAT, "arch": json.dumps(asdict(TINY_BASE))})
    model = load_base_model(None, path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), source.forward_features(x), atol=0, rtol=0)


def test_img_size_override_builds_other_grid():
    model = load_base_model(ViTArch(name="vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1, num_heads=2),
                            None, img_size=48)
    assert model.patch_embed.grid_size == (6, 6)


def _bad(tmp_path, name, source):
    sd = _sd(source)
    if name == "missing":
        del sd["blocks.1.mlp.fc2.weight"]
        return _save(tmp_path / "missing.pth", {"model": sd}), "missing encoder weight 'blocks.1.mlp.fc2.weight'"
    if name == "shape":
        sd["blocks.0.attn.qkv.weight"] = torch.zeros(90, 32)
        return _save(tmp_path / "shape.pth", sd), "shape mismatch at 'blocks.0.attn.qkv.weight'"
    if name == "deeper":
        sd["blocks.2.norm1.weight"] = torch.zeros(32)
        return _save(tmp_path / "deeper.pth", sd), "unexpected weight 'blocks.2.norm1.weight'"
    if name == "layout":
        return _save(tmp_path / "layout.pth", {"optimizer": {"lr": 1}, "epoch": 3}), "unknown checkpoint layout"
    if name == "text":
        (tmp_path / "notes.pth").write_text("not a checkpoint")
        return tmp_path / "notes.pth", "not a checkpoint"
    if name == "pickle_code":  # weights_only=True refuses arbitrary objects
        return _save(tmp_path / "obj.pth", {"model": ViTArch()}), "not a checkpoint"
    if name == "safetensors":
        (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
        return tmp_path / "broken.safetensors", "not a safetensors checkpoint"
    if name == "not_found":
        return tmp_path / "nope.pth", "checkpoint file not found"
    if name == "no_arch":
        save_file(sd, tmp_path / "plain.safetensors")
        return tmp_path / "plain.safetensors", "no architecture given"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["missing", "shape", "deeper", "layout", "text", "pickle_code", "safetensors",
                                  "not_found", "no_arch"])
def test_bad_checkpoint_is_one_clear_line(name, source, tmp_path):
    path, expected = _bad(tmp_path, name, source)
    arch = None if name == "no_arch" else TINY_BASE
    with pytest.raises(CheckpointError) as info:
        load_base_model(arch, path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_reading_a_checkpoint_with_an_input_adapter_draws_no_random_numbers(tmp_path):
    """Folding T' = MLP(T) into the cls token builds the MLP without an init: a fine-tune's head,
    seeded before or after the read, starts the same either way."""
    g = torch.Generator().manual_seed(0)
    sd = {"cls_token": torch.randn(1, 1, 8, generator=g), "pos_embed": torch.randn(1, 5, 8, generator=g),
          "cls_token_mlp.fc1.weight": torch.randn(32, 8, generator=g), "cls_token_mlp.fc1.bias": torch.randn(32, generator=g),
          "cls_token_mlp.fc2.weight": torch.randn(8, 32, generator=g), "cls_token_mlp.fc2.bias": torch.randn(8, generator=g)}
    torch.save({"model": sd}, tmp_path / "tec.pth")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    read, entry, _ = read_checkpoint(tmp_path / "tec.pth")
    assert torch.equal(torch.get_rng_state(), before) and entry == "model"
    t = sd["cls_token"].double()
    h = t @ sd["cls_token_mlp.fc1.weight"].double().T + sd["cls_token_mlp.fc1.bias"].double()
    folded = (0.5 * h * (1 + torch.erf(h / 2 ** 0.5))) @ sd["cls_token_mlp.fc2.weight"].double().T \
        + sd["cls_token_mlp.fc2.bias"].double()
    assert set(read) == {"cls_token", "pos_embed"}
    torch.testing.assert_close(read["cls_token"].double(), folded, rtol=0, atol=1e-5)
