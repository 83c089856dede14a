"""Scoring a classifier on the val split: top-1 / top-5 accuracy, and the per-image top-1 hits a
paired comparison of two models needs (`evaluate.statistics`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..evaluate.statistics import hit_string


def top5_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per image, whether the label is among the 5 highest logits (all of them with fewer classes)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
    return (top == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict:
    """top1, top5 (percent) and the top-1 hit string over the whole val split, all processes together
    (accelerate's gather_for_metrics drops the padding of the last batch); the model is left in train mode."""
    model.eval()
    preds, labels, top5 = [], [], []
    for images, y in loader:
        with accelerator.autocast():
            logits = model(images.to(accelerator.device)).float()  # (B, classes)
        y = y.to(accelerator.device)
        for out, value in ((preds, logits.argmax(1)), (labels, y), (top5, top5_correct(logits, y))):
            out.append(accelerator.gather_for_metrics(value).cpu())
    model.train()
    pred, label = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {"top1": 100 * float((pred == label).mean()), "top5": 100 * torch.cat(top5).float().mean().item(),
            "hits": hit_string(pred, label)}


def best_of(history: list[dict]) -> dict:
    """The epoch record of highest top-1 (the first of equals)."""
    return max(history, key=lambda r: r["top1"]) if history else {}
