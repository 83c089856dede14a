"""A fine-tuning run's state on disk: its identity (what a resume may not change) and the final
JSON (its checkpoint is stage two's, with the per-epoch scores: `finetune.loop`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..files import write_json
from ..models.base import file_sha256
from ..train.checkpoint import config_identity
from .config import FinetuneConfig
from .score import best_of

RESULT_FILE = "result.json"
# What a resume may change: where the run logs, how fast it loads and where its splits lie (their
# content is in the identity: image counts and class names).
RESUMABLE = ("output", "train.log_every", "train.checkpoint_every", "data.num_workers", "data.train", "data.val")


def finetune_identity(settings: dict, data: dict) -> dict:
    """The dotted `settings`, the splits (`data`: image counts, class names) and the starting encoder by content."""
    ckpt = settings["model.checkpoint"]
    starts = {"model.checkpoint": file_sha256(ckpt)} if ckpt and Path(ckpt).is_file() else {}
    return {"config": config_identity(settings, RESUMABLE), "data": data, "checkpoint_sha256": starts}


def write_result(out: Path, cfg: FinetuneConfig, step: int, total: int, history: list[dict],
                 hits: Optional[str]) -> dict:
    """RUN/result.json: the last and the best epoch's top-1 / top-5, every epoch's, the last top-1 hits."""
    last, best = (history[-1] if history else {}), best_of(history)
    result = {"protocol": cfg.protocol, "checkpoint": cfg.model.checkpoint, "step": step, "finished": step >= total,
              "top1": last.get("top1"), "top5": last.get("top5"), "best_top1": best.get("top1"),
              "best_epoch": best.get("epoch"), "epochs": history, "hits": hits}
    write_json(out / RESULT_FILE, result, "the fine-tuning result")
    return result
