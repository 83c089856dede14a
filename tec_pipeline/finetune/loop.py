"""Fine-tuning's and probing's loop (Tab. 10, Tab. 11), as MAE's fine-tuning `train_one_epoch`
reads: per micro-batch the Mixup / CutMix targets, the forward and the classification loss, the
backward; per optimizer step its record; at every epoch's end the val split's scores and the
checkpoint that keeps them. Built from stage two's loop pieces (`train.loop`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from ..train.log import Meter, RunLog
from ..train.loop import Run, backward, end_step, save, save_due, start_micro_batch
from .config import FinetuneConfig
from .data import LabelledImages, epoch_keys, seed_everything
from .score import best_of, evaluate


@dataclass(frozen=True)
class ClassifierStep:
    """What every fine-tuning step computes with, fixed for the run."""

    loss: Callable[..., torch.Tensor]  # `model.classification_loss`, compiled with train.compile
    criterion: torch.nn.Module  # soft-target cross-entropy under Mixup, label smoothing or plain
    mixup: Optional[Callable]  # timm Mixup, or None (the probe)
    precision: Optional[torch.dtype]  # the forward's autocast dtype, None: float32


@dataclass
class EpochScores:
    """The val split's scores so far, kept in every checkpoint."""

    history: list[dict] = field(default_factory=list)  # one {epoch, step, top1, top5} per evaluation
    hits: Optional[str] = None  # the last evaluation's top-1 hits, in val-split order


def train_classifier(run: Run, cfg: FinetuneConfig, step: ClassifierStep, train_set: LabelledImages,
                     val_loader: DataLoader, scores: EpochScores, end: int, log: RunLog, bar) -> dict:
    """Optimizer steps from `run.step` to `end`, epoch loader after epoch loader; the last record
    written ({} when none was)."""
    acc, accum, meter, last = run.accelerator, run.settings.accum_steps, Meter(run.accelerator), {}
    micro, per_epoch = run.step * accum, run.schedule.steps_per_epoch
    while run.step < end:
        fetch = time.perf_counter()
        for batch in epoch_loader(run, cfg, train_set, micro):  # (images (B, 3, S, S), labels (B,))
            meter.waited += time.perf_counter() - fetch
            lr = start_micro_batch(run, micro)
            seed_everything(cfg.seed, micro, acc.process_index)  # Mixup (numpy) and drop path (torch) draws
            images, labels = (t.to(acc.device, non_blocking=True) for t in batch)
            targets = labels
            if step.mixup is not None:
                images, targets = step.mixup(images, labels)  # targets (B, classes), rows sum to 1
            with acc.accumulate(run.model):
                loss = step.loss(run.model, step.criterion, images, targets, step.precision)
                backward(run, meter, {"loss": loss}, images.shape[0])
            micro += 1
            if micro % accum == 0:
                run.step += 1
                whole_epoch = run.step % per_epoch == 0
                epoch_end = whole_epoch or run.step == run.schedule.total_steps
                saving = save_due(run, end) or whole_epoch  # every epoch's scores kept
                last = end_step(run, meter, lr, micro / run.schedule.batches_per_epoch, end, saving, log, bar) or last
                if epoch_end:
                    with meter.paused():
                        score_epoch(run, val_loader, scores, log)
                if saving:
                    save(run, {"history": scores.history, "hits": scores.hits}, "the fine-tuning checkpoint")
                if run.step >= end:
                    break
            fetch = time.perf_counter()
    return last


def epoch_loader(run: Run, cfg: FinetuneConfig, train_set: LabelledImages, micro: int) -> DataLoader:
    """This process's loader of the epoch that micro-batch `micro` falls in, started at that batch."""
    acc, per_epoch, d = run.accelerator, run.schedule.batches_per_epoch, cfg.data
    epoch, start = divmod(micro, per_epoch)
    keys = epoch_keys(len(train_set), cfg.seed, epoch, d.batch_size, acc.num_processes, acc.process_index, per_epoch)
    return DataLoader(train_set, batch_sampler=keys[start:], num_workers=d.num_workers,
                      pin_memory=torch.cuda.is_available())


def score_epoch(run: Run, val_loader: DataLoader, scores: EpochScores, log: RunLog) -> None:
    """Score the val split; keep the record, the best so far and the last top-1 hits."""
    found = evaluate(run.model, val_loader, run.accelerator)
    scores.hits = found.pop("hits")
    record = {"epoch": run.step / run.schedule.steps_per_epoch, "step": run.step, **found}
    scores.history.append(record)
    log.write({**record, "best_top1": best_of(scores.history)["top1"]})
