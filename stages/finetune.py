"""`tec-pipeline finetune` (Tab. 10) and `tec-pipeline linprobe` (Tab. 11, Tab. 4): score an encoder
by training a classifier on a labelled train split and measuring top-1 / top-5 on a val split.

A driver: the pieces live in `tec_pipeline.finetune` (settings, splits, timm's transforms and Mixup, the
classifier and probes with their optimizers, scoring, state) and stage two's `tec_pipeline.train`
(schedule, logs, checkpoints). What this module adds is the loop: set up, resume, micro-steps with
lr per iteration, an evaluation after every epoch, atomic checkpoints, the final JSON.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stages.train import make_accelerator
from tec_pipeline.config import to_dict
from tec_pipeline.export import CHECKPOINT, load_checkpoint
from tec_pipeline.files import write_json
from tec_pipeline.finetune.config import FinetuneConfig
from tec_pipeline.finetune.data import LabelledImages, criterion, epoch_keys, mixup, seed_everything
from tec_pipeline.finetune.model import build_model, make_optimizer
from tec_pipeline.finetune.splits import open_splits
from tec_pipeline.finetune.score import best_of, evaluate
from tec_pipeline.finetune.state import finetune_identity, save_run, write_result
from tec_pipeline.train.checkpoint import IDENTITY_FILE, check_resumable, restore_state, run_dir
from tec_pipeline.train.log import Meter, RunLog, check_finite_losses, logged_losses, scalars
from tec_pipeline.train.schedule import Schedule, make_schedule, set_lr


@dataclass
class FtRun:
    """Everything a fine-tuning or probing run holds while it trains."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_set: LabelledImages
    val_loader: DataLoader
    mixup: object  # timm Mixup, or None (the probe)
    loss: torch.nn.Module
    ckpt_path: Path
    step: int = 0
    last_saved: int = -1
    history: list = field(default_factory=list)  # one {epoch, step, top1, top5} per evaluation
    hits: Optional[str] = None  # the last evaluation's top-1 hits, in val-folder order


def setup_run(cfg: FinetuneConfig, accelerator: Accelerator, path: Path) -> tuple[FtRun, dict]:
    """Splits, classifier (or probe), schedule (lr = blr x effective batch / 256), optimizer, Mixup, loss."""
    train_set, val_set, data = open_splits(cfg)
    classes = len(data["classes"])
    seed_everything(cfg.seed)  # the fresh head (and a random-init encoder) are a function of the seed
    model = build_model(cfg, classes)
    schedule = make_schedule(cfg, len(train_set), accelerator.num_processes, cfg.train.max_steps)
    optimizer = make_optimizer(cfg, model, schedule.lr)
    val_loader = DataLoader(val_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    mix = mixup(cfg, classes)
    run = FtRun(cfg, accelerator, model, optimizer, schedule, train_set, val_loader, mix,
                criterion(cfg, mix is not None), path / CHECKPOINT)
    return run, data


def epoch_loader(run: FtRun, micro: int) -> DataLoader:
    """This process's loader of the epoch that micro-batch `micro` falls in, started at that batch."""
    acc, per_epoch, d = run.accelerator, run.schedule.batches_per_epoch, run.cfg.data
    epoch, start = divmod(micro, per_epoch)
    keys = epoch_keys(len(run.train_set), run.cfg.seed, epoch, d.batch_size, acc.num_processes, acc.process_index,
                      per_epoch)
    return DataLoader(run.train_set, batch_sampler=keys[start:], num_workers=d.num_workers,
                      pin_memory=torch.cuda.is_available())


def micro_step(run: FtRun, images: torch.Tensor, labels: torch.Tensor, micro: int) -> float:
    """Mixup / CutMix targets, loss, finite check, backward; the prepared optimizer steps once per cycle."""
    acc = run.accelerator
    seed_everything(run.cfg.seed, micro, acc.process_index)  # Mixup (numpy) and drop path (torch) draws
    with acc.accumulate(run.model):
        images, labels = images.to(acc.device, non_blocking=True), labels.to(acc.device, non_blocking=True)
        targets = labels
        if run.mixup is not None:
            images, targets = run.mixup(images, labels)  # targets (B, classes), rows sum to 1
        loss = run.loss(run.model(images), targets)
        value = logged_losses(acc, {"loss": loss})
        check_finite_losses(value, run.step, run.ckpt_path, run.last_saved)
        acc.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return value["loss"]


def end_epoch(run: FtRun, log: RunLog) -> None:
    """Score the val split, keep the record (and the best so far) in the history and the log."""
    scores = evaluate(run.model, run.val_loader, run.accelerator)
    run.hits = scores.pop("hits")
    record = {"epoch": run.step / run.schedule.steps_per_epoch, "step": run.step, **scores}
    run.history.append(record)
    log.write({**record, "best_top1": best_of(run.history)["top1"]})


def train_until(run: FtRun, end: int, log: RunLog, bar) -> None:
    """Optimizer steps until `end`: lr per iteration, logs, an evaluation per epoch, atomic checkpoints."""
    cfg, accum, meter, s = run.cfg, run.cfg.optim.accum_steps, Meter(), run.schedule
    micro = run.step * accum
    while run.step < end:
        fetch = time.perf_counter()
        for images, labels in epoch_loader(run, micro):
            meter.waited += time.perf_counter() - fetch
            lr = s.lr_at(run.step, cfg.optim.min_lr)
            if micro % accum == 0:
                set_lr(run.optimizer, lr)  # times each group's layer-decay lr_scale
            meter.add({"loss": micro_step(run, images, labels, micro)}, images.shape[0] * run.accelerator.num_processes,
                      accum)
            micro += 1
            if micro % accum:
                fetch = time.perf_counter()
                continue
            run.step += 1
            if run.step % cfg.train.log_every == 0 or run.step == end:
                last = meter.record(run.step, micro / s.batches_per_epoch, lr)
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{last['images_per_s']:.1f}")
            meter.sums = {}
            bar.update(1)
            if run.step % s.steps_per_epoch == 0 or run.step == s.total_steps:
                end_epoch(run, log)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == end or run.step % s.steps_per_epoch == 0:
                save_run(run.ckpt_path, run.accelerator, run.model, run.optimizer, run.step, run.history, run.hits)
                run.last_saved = run.step
            if run.step >= end:
                break
            fetch = time.perf_counter()


def resume_run(run: FtRun, path: Path, identity: dict) -> None:
    """Refuse changed settings, splits or encoder; load weights, optimizer, step and scores so far."""
    check_resumable(path, identity)
    state = load_checkpoint(run.ckpt_path)
    run.step = run.last_saved = restore_state(state, run.accelerator, run.model, run.optimizer)
    run.history, run.hits = list(state["history"]), state["hits"]


def run_finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: Optional[int] = None) -> dict:
    """Fine-tune (``cfg.protocol`` finetune) or probe (linprobe) into ``cfg.output``; returns the result
    written to RUN/result.json. `stop_after` ends after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule."""
    path = run_dir(cfg, resume)
    accelerator = make_accelerator(cfg, path)
    try:
        run, data = setup_run(cfg, accelerator, path)
        identity = finetune_identity(cfg, data)
        if resume:
            resume_run(run, path, identity)
        if accelerator.is_main_process:
            write_json(path / IDENTITY_FILE, identity, "the run's identity")
            write_json(path / "config.json", to_dict(cfg), "the run's config")
        accelerator.init_trackers(cfg.protocol, config=scalars(cfg))
        log, total = RunLog(path, accelerator, run.step), run.schedule.total_steps
        end = min(total, stop_after) if stop_after is not None else total
        with tqdm(total=total, initial=run.step, desc=cfg.protocol, unit="step",
                  disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
            train_until(run, end, log, bar)
        result = write_result(path, cfg, run.step, total, run.history, run.hits) if accelerator.is_main_process else {}
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state()  # let a later run in this process pick another mixed precision
    return result
