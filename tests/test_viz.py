"""Pictures: loss curves and the attention figure are written as real PNGs."""
import json

import torch
from PIL import Image

from helpers import TINY_BASE
from tec_pipeline.models.base import load_base_model
from tec_pipeline.viz import cls_attention, plot_attention, plot_loss_curves


def test_loss_curves_png(tmp_path):
    for name in ("tec", "control"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for step in range(5):
                f.write(json.dumps({"step": step, "loss": 5.0 - step, "loss_fea": 1.0 / (step + 1)}) + "\n")
    out = plot_loss_curves({"tec": tmp_path / "tec.jsonl", "control": tmp_path / "control.jsonl"}, tmp_path / "l.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400  # two panels: loss and loss_fea


def test_cls_attention_is_a_distribution_and_figure_written(tmp_path):
    base = load_base_model(TINY_BASE, None)
    images = torch.randn(3, 3, 32, 32)
    att, logits = cls_attention(base, images, tau=1.0)
    assert att.shape == (3, 16) and logits.shape == (3, 2, 16)
    torch.testing.assert_close(att.sum(-1), torch.ones(3))
    out = plot_attention(base, base, images, k=4, tau=1.0, out=tmp_path / "att.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height == 3 * 200  # one 2-inch row per image at 100 dpi
