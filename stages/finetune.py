"""`tec-pipeline finetune` (Tab. 10) and `tec-pipeline linprobe` (Tab. 11, Tab. 4): score an encoder
by training a classifier on a labelled train split and measuring top-1 / top-5 on a val split.

A driver, read top to bottom: the run's folder and accelerator; the splits, the classifier (or
probe), the schedule and optimizer (`tec_pipeline.finetune`); a resume from the checkpoint; the
loop (`finetune.loop.train_classifier`, where the step is); the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from torch.utils.data import DataLoader

from tec_pipeline.config import flatten, to_dict
from tec_pipeline.files import write_json
from tec_pipeline.finetune.config import FinetuneConfig
from tec_pipeline.finetune.data import LabelledImages, criterion, mixup, seed_everything
from tec_pipeline.finetune.loop import ClassifierStep, EpochScores, train_classifier
from tec_pipeline.finetune.model import (Encoder, build_model, classification_loss, make_optimizer, read_encoder,
                                         step_graph)
from tec_pipeline.finetune.splits import open_splits
from tec_pipeline.finetune.state import finetune_identity, write_result
from tec_pipeline.train.checkpoint import CHECKPOINT, IDENTITY_FILE, run_dir
from tec_pipeline.train.log import RunLog, scalars
from tec_pipeline.train.loop import (PRECISIONS, LoopSettings, Run, compiled, end_run, last_step, make_accelerator,
                                     prepare, progress, resume_run)
from tec_pipeline.train.schedule import make_schedule


def run_finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: Optional[int] = None) -> dict:
    """Fine-tune (``cfg.protocol`` finetune) or probe (linprobe) into ``cfg.output``; returns the result
    written to RUN/result.json. `stop_after` ends after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule."""
    record = to_dict(cfg)  # the config as the run records it: config.json, trackers
    settings = flatten(record)  # the same, dotted: its identity and the checks that name a setting
    path = run_dir(cfg.output, settings, resume)
    encoder = read_encoder(cfg, settings)  # its sizes refused before the splits are listed
    accelerator = make_accelerator(cfg.optim.mixed_precision, cfg.optim.accum_steps, path)
    try:
        train_set, val_set, data = open_splits(cfg)
        run, step, val_loader = setup_run(cfg, accelerator, path, train_set, val_set, len(data["classes"]), encoder)
        del encoder  # the classifier holds its weights now: the read copy is not kept for the whole run
        identity, scores = finetune_identity(settings, data), EpochScores()
        if resume:
            state = resume_run(run, identity)
            scores = EpochScores(list(state["history"]), state["hits"])
        if accelerator.is_main_process:
            write_json(path / IDENTITY_FILE, identity, "the run's identity")
            write_json(path / "config.json", record, "the run's config")
        accelerator.init_trackers(cfg.protocol, config=scalars(settings))
        log, end = RunLog(path, accelerator, run.step), last_step(run, stop_after)
        with progress(run, cfg.protocol) as bar:
            train_classifier(run, cfg, step, train_set, val_loader, scores, end, log, bar)
        total = run.schedule.total_steps
        result = write_result(path, cfg, run.step, total, scores.history, scores.hits) \
            if accelerator.is_main_process else {}
    finally:
        end_run(accelerator)
    return result


def setup_run(cfg: FinetuneConfig, accelerator: Accelerator, path: Path, train_set: LabelledImages, val_set,
              classes: int, encoder: Optional[Encoder]) -> tuple[Run, ClassifierStep, DataLoader]:
    """Classifier (or probe), schedule (lr = blr x effective batch / 256), optimizer, Mixup, loss."""
    seed_everything(cfg.seed)  # the fresh head (and a random-init encoder) are a function of the seed
    model = build_model(cfg, classes, encoder)
    schedule = make_schedule(cfg, len(train_set), accelerator.num_processes, cfg.train.max_steps)
    optimizer = make_optimizer(cfg, model, schedule.lr)
    val_loader = DataLoader(val_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
    model, optimizer, val_loader = prepare(accelerator, model, optimizer, val_loader)
    mix = mixup(cfg, classes)
    loop = LoopSettings(accum_steps=cfg.optim.accum_steps, min_lr=cfg.optim.min_lr,
                        log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every)
    run = Run(accelerator=accelerator, model=model, optimizer=optimizer, schedule=schedule, settings=loop,
              ckpt_path=path / CHECKPOINT)
    step = ClassifierStep(loss=compiled(classification_loss, cfg.train.compile, accelerator, step_graph(cfg)),
                          criterion=criterion(cfg, mix is not None), mixup=mix,
                          precision=PRECISIONS[cfg.optim.mixed_precision])
    return run, step, val_loader
