"""Pictures of a run: loss curves, the monitor's score against its base, and the attention of base and
new model (the paper's Fig. 2 idea)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_path
from .models.base import base_forward
from .views import IMAGENET_MEAN, IMAGENET_STD


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | Path) -> list[dict]:
    """The per-step records of a training log (JSONL)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(logs: dict[str, str | Path], out: str | Path) -> Path:
    """One panel per loss term, one line per run."""
    plt = _pyplot()
    runs = {name: read_log(path) for name, path in logs.items()}
    terms = sorted({k for recs in runs.values() for r in recs for k in r if k.startswith("loss")})
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, recs in runs.items():
            pts = [(r["step"], r[term]) for r in recs if term in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


MONITOR_METRICS = {"knn": "k-NN", "linear": "linear probe"}


def plot_monitor(log: str | Path, out: str | Path) -> Path:
    """A watched run (`train.monitor`) from its log: the loss against steps, and beside it each
    monitored top-1 against steps with the base's as a dashed line of the same colour."""
    plt = _pyplot()
    recs = read_log(log)
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    if losses:
        loss_ax.plot(*zip(*losses), color="0.3")
    loss_ax.set(title="training loss", xlabel="step")
    for i, (metric, name) in enumerate(MONITOR_METRICS.items()):
        pts = [(r["step"], 100 * r[f"monitor/{metric}_top1"]) for r in recs if f"monitor/{metric}_top1" in r]
        if not pts:
            continue
        colour = f"C{i}"
        score_ax.plot(*zip(*pts), marker="o", color=colour, label=f"new model, {name}")
        base = next((r[f"monitor/base_{metric}_top1"] for r in recs if f"monitor/base_{metric}_top1" in r), None)
        if base is not None:
            score_ax.axhline(100 * base, color=colour, linestyle="--", label=f"base, {name}")
    score_ax.set(title="monitor: top-1 % on its val images", xlabel="step")
    if score_ax.lines:
        score_ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out, "the monitor picture") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out)


def cls_attention(vit, images: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Head-mean softmax of the last block's cls row over patches, and its logits (B, H, L)."""
    logits = base_forward(vit, images, last_layers=1).logits[:, :, 0, 1:]
    return (logits / tau).softmax(-1).mean(1), logits


def _denormalize(images: Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def plot_attention(base, new, images: Tensor, k: int, tau: float, out: str | Path) -> Path:
    """Rows: image | base top-k patches | base attention target (cls row, softmax(As/tau)) | new model's.

    `new` is the exported encoder of the new model (a timm ViT, input adapter folded in).
    """
    plt = _pyplot()
    grid = base.patch_embed.grid_size
    base_att, base_logits = cls_attention(base, images, tau)
    new_att, _ = cls_attention(new, images, tau)
    topk = base_logits.mean(1).topk(k, dim=-1).indices
    pics = _denormalize(images)
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for i, row in enumerate(axes):
        chosen = np.zeros(grid[0] * grid[1])
        chosen[topk[i].cpu().numpy()] = 1
        panels = [(pics[i], "image"), (chosen.reshape(grid), f"base top-{k}"),
                  (base_att[i].cpu().numpy().reshape(grid), "base cls attention"),
                  (new_att[i].cpu().numpy().reshape(grid), "new model cls attention")]
        for ax, (pic, title) in zip(row, panels):
            ax.imshow(pic, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
