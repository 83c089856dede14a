"""Export (Sec. 2.2, Tab. 7): a timm-loadable encoder with the input adapter folded into cls."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import TINY_BASE, tiny_arch, write_images
from tec_pipeline.stages.train import run_train
from tec_pipeline.config import Config, TrainConfig
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT, export_run
from tec_pipeline.train.checkpoint import build_model, load_checkpoint
from tec_pipeline.models.base import EXPORT_FORMAT, export_arch, load_base_model
from tec_pipeline.base_targets import compute_targets

BASE, NEW = TINY_BASE, tiny_arch(embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A short online run (random-init base) with both adapters, trained a few steps."""
    root = tmp_path_factory.mktemp("export")
    images = write_images(root / "images", 8, size=(40, 44), name="{i}.png")  # a run never lies in its images
    cfg = Config(seed=0, output=str(root / "run"))
    cfg.base = replace(cfg.base, arch=BASE, checkpoint=None)
    cfg.model = replace(cfg.model, arch=NEW, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg.targets = replace(cfg.targets, source="online", k=3)
    cfg.data = replace(cfg.data, path=str(images), img_size=32, batch_size=4, num_workers=0)
    cfg.optim = replace(cfg.optim, blr=0.05)
    cfg.train = TrainConfig(max_steps=3)
    run_train(cfg)
    return Path(cfg.output)


def test_export_loads_strictly_in_timm_and_matches_encode(run):
    path = export_run(run)
    assert path == run / "encoder.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == EXPORT_FORMAT
    arch = export_arch(meta)
    assert asdict(arch) == asdict(NEW)
    vit = timm.create_model(arch.name, pretrained=False, num_classes=0,
                            **{k: v for k, v in asdict(arch).items() if k != "name"})
    vit.load_state_dict(load_file(str(path)), strict=True)
    state = load_checkpoint(run / CHECKPOINT)
    model = build_model(state["model_kwargs"])
    model.load_state_dict(state["model"])
    assert model.input_adapter is not None and model.encoder_adapter is not None
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (vit.eval().forward_features(images) - model.eval().encode(images)).abs().max().item()
        raw = model.encoder.cls_token
        assert not torch.allclose(load_file(str(path))["cls_token"], raw)  # the adapter was folded in
    assert diff <= 1e-5, diff
    assert not any(k.startswith(("input_adapter", "encoder_adapter", "decoder", "feat_branch")) for k in load_file(str(path)))


def test_export_is_a_base_model_for_a_second_round(run, tmp_path):
    """Tab. 7: the exported TEC encoder is the base model of the next round."""
    path = export_run(run, tmp_path / "round1.safetensors")
    base = load_base_model(None, path)  # architecture read from the export's metadata
    targets = compute_targets(base, torch.randn(2, 3, 32, 32), last_layers=2, k=4)
    assert targets.feat.shape == (2, 16, 48) and targets.attn.shape == (2, 5, 3, 16)
    cfg = Config(seed=1, output=str(tmp_path / "round2"))
    cfg.base = replace(cfg.base, arch=NEW, checkpoint=str(path))
    cfg.model = replace(cfg.model, arch=NEW, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg.targets = replace(cfg.targets, source="online", k=3)
    cfg.data = replace(cfg.data, path=json.loads((run / "config.json").read_text())["data"]["path"], img_size=32,
                       batch_size=4, num_workers=0)
    cfg.train = TrainConfig(max_steps=1)
    summary = run_train(cfg)
    assert summary["step"] == 1 and np.isfinite(summary["losses"]["loss"])
    assert load_checkpoint(tmp_path / "round2" / CHECKPOINT)["model_kwargs"]["feat_dim"] == 48


def test_export_without_a_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint") as err:
        export_run(tmp_path)
    assert "\n" not in str(err.value)


def test_export_to_a_full_disk_is_one_line_and_leaves_no_file(run, tmp_path):
    from helpers import fill_to, small_filesystem

    with small_filesystem(tmp_path / "small", "1m") as disk:
        filler = fill_to(disk, 64 * 1024)  # the encoder needs ~0.35 MB
        out = disk / "encoder.safetensors"
        with pytest.raises(UserError, match=f"cannot write the encoder export {out}: No space left on device") as err:
            export_run(run, out)
        assert "\n" not in str(err.value) and list(disk.iterdir()) == [filler]
        filler.unlink()
        assert export_run(run, out) == out and load_file(str(out))
