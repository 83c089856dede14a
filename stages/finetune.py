"""`tec-pipeline finetune` (Tab. 10) and `tec-pipeline linprobe` (Tab. 11, Tab. 4): score an encoder
by training a classifier on a labelled train split and measuring top-1 / top-5 on a val split.

A driver: the pieces live in `tec_pipeline.finetune` (settings, splits, timm's transforms and Mixup, the
classifier and probes with their optimizers, scoring, state) and stage two's `tec_pipeline.train`
(schedule, logs, checkpoints, the loop). What this module adds is what one fine-tuning step is, the
evaluation after every epoch, and the order: set up, resume, run the loop, write the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from tec_pipeline.config import to_dict
from tec_pipeline.export import CHECKPOINT, load_checkpoint
from tec_pipeline.files import write_json
from tec_pipeline.finetune.config import FinetuneConfig
from tec_pipeline.finetune.data import LabelledImages, criterion, epoch_keys, mixup, seed_everything
from tec_pipeline.finetune.model import build_model, classification_loss, make_optimizer, step_graph
from tec_pipeline.finetune.score import best_of, evaluate
from tec_pipeline.finetune.splits import open_splits
from tec_pipeline.finetune.state import finetune_identity, save_run, write_result
from tec_pipeline.train.checkpoint import IDENTITY_FILE, check_resumable, restore_state, run_dir
from tec_pipeline.train.log import RunLog, scalars
from tec_pipeline.train.loop import (PRECISIONS, LoopRun, LoopSettings, compiled, end_run, make_accelerator, prepare,
                                     run_loop)
from tec_pipeline.train.schedule import make_schedule


@dataclass(kw_only=True)
class FinetuneRun(LoopRun):
    """A fine-tuning or probing run: the loop's run plus its splits, Mixup, loss and scores."""

    cfg: FinetuneConfig
    train_set: LabelledImages
    val_loader: DataLoader
    mixup: Optional[object]  # timm Mixup, or None (the probe)
    loss: torch.nn.Module
    step_loss: Callable = classification_loss  # compiled with train.compile
    history: list = field(default_factory=list)  # one {epoch, step, top1, top5} per evaluation
    hits: Optional[str] = None  # the last evaluation's top-1 hits, in val-split order

    def loader(self, micro: int) -> DataLoader:
        """This process's loader of the epoch that micro-batch `micro` falls in, started at that batch."""
        acc, per_epoch, d = self.accelerator, self.schedule.batches_per_epoch, self.cfg.data
        epoch, start = divmod(micro, per_epoch)
        keys = epoch_keys(len(self.train_set), self.cfg.seed, epoch, d.batch_size, acc.num_processes,
                          acc.process_index, per_epoch)
        return DataLoader(self.train_set, batch_sampler=keys[start:], num_workers=d.num_workers,
                          pin_memory=torch.cuda.is_available())

    def losses(self, batch, micro: int):
        """Mixup / CutMix targets and the classification loss of one micro-batch."""
        acc = self.accelerator
        seed_everything(self.cfg.seed, micro, acc.process_index)  # Mixup (numpy) and drop path (torch) draws
        images, labels = (t.to(acc.device, non_blocking=True) for t in batch)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # targets (B, classes), rows sum to 1
        loss = self.step_loss(self.model, self.loss, images, targets, PRECISIONS[self.cfg.optim.mixed_precision])
        return {"loss": loss}, images.shape[0]

    def after_step(self, log: RunLog) -> None:
        """At the end of every epoch: score the val split, keep the record and the best so far."""
        if self.step % self.schedule.steps_per_epoch and self.step != self.schedule.total_steps:
            return
        scores = evaluate(self.model, self.val_loader, self.accelerator)
        self.hits = scores.pop("hits")
        record = {"epoch": self.step / self.schedule.steps_per_epoch, "step": self.step, **scores}
        self.history.append(record)
        log.write({**record, "best_top1": best_of(self.history)["top1"]})

    def save_due(self, end: int) -> bool:
        return super().save_due(end) or self.step % self.schedule.steps_per_epoch == 0  # every epoch's scores kept

    def save(self) -> None:
        save_run(self.ckpt_path, self.accelerator, self.model, self.optimizer, self.step, self.history, self.hits)


def setup_run(cfg: FinetuneConfig, accelerator: Accelerator, path: Path) -> tuple[FinetuneRun, dict]:
    """Splits, classifier (or probe), schedule (lr = blr x effective batch / 256), optimizer, Mixup, loss."""
    train_set, val_set, data = open_splits(cfg)
    classes = len(data["classes"])
    seed_everything(cfg.seed)  # the fresh head (and a random-init encoder) are a function of the seed
    model = build_model(cfg, classes)
    schedule = make_schedule(cfg, len(train_set), accelerator.num_processes, cfg.train.max_steps)
    optimizer = make_optimizer(cfg, model, schedule.lr)
    val_loader = DataLoader(val_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
    model, optimizer, val_loader = prepare(accelerator, model, optimizer, val_loader)
    mix = mixup(cfg, classes)
    settings = LoopSettings(accum_steps=cfg.optim.accum_steps, min_lr=cfg.optim.min_lr,
                            log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every)
    run = FinetuneRun(accelerator=accelerator, model=model, optimizer=optimizer, schedule=schedule, settings=settings,
                      ckpt_path=path / CHECKPOINT, cfg=cfg, train_set=train_set, val_loader=val_loader, mixup=mix,
                      loss=criterion(cfg, mix is not None),
                      step_loss=compiled(classification_loss, cfg.train.compile, accelerator, step_graph(cfg)))
    return run, data


def resume_run(run: FinetuneRun, path: Path, identity: dict) -> None:
    """Refuse changed settings, splits or encoder; load weights, optimizer, step and scores so far."""
    check_resumable(path, identity)
    state = load_checkpoint(run.ckpt_path)
    run.step = run.last_saved = restore_state(state, run.accelerator, run.model, run.optimizer, run.ckpt_path)
    run.history, run.hits = list(state["history"]), state["hits"]


def run_finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: Optional[int] = None) -> dict:
    """Fine-tune (``cfg.protocol`` finetune) or probe (linprobe) into ``cfg.output``; returns the result
    written to RUN/result.json. `stop_after` ends after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule."""
    path = run_dir(cfg, resume)
    accelerator = make_accelerator(cfg.optim.mixed_precision, cfg.optim.accum_steps, path)
    try:
        run, data = setup_run(cfg, accelerator, path)
        identity = finetune_identity(cfg, data)
        if resume:
            resume_run(run, path, identity)
        if accelerator.is_main_process:
            write_json(path / IDENTITY_FILE, identity, "the run's identity")
            write_json(path / "config.json", to_dict(cfg), "the run's config")
        accelerator.init_trackers(cfg.protocol, config=scalars(cfg))
        run_loop(run, path, stop_after, desc=cfg.protocol)
        total = run.schedule.total_steps
        result = write_result(path, cfg, run.step, total, run.history, run.hits) if accelerator.is_main_process else {}
    finally:
        end_run(accelerator)
    return result
