"""Stage two, `tec-pipeline train`: train the new model from the target cache (or online, or on
pixels) with accelerate.

A driver, read top to bottom: the run's folder and accelerator; its data (`train.data`: the
targets and views each step gets) and new model (`train.model`); the Tab. 8 schedule, AdamW and
accelerate's preparation; the monitor (``train.monitor``); a resume from the checkpoint
(`train.checkpoint`); then the loader from the run's step on and the loop (`train.loop.train_tec`),
where the step is.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from tec_pipeline.config import Config, flatten, to_dict
from tec_pipeline.files import write_json
from tec_pipeline.models.tec import TECModel, count_parameters
from tec_pipeline.step import tec_losses
from tec_pipeline.train.batches import TargetReader
from tec_pipeline.train.checkpoint import CHECKPOINT, IDENTITY_FILE, run_dir, run_identity
from tec_pipeline.train.data import TrainData, open_data
from tec_pipeline.train.loader import EpochPlanner, PlannedBatches, batch_loader, mask_noise
from tec_pipeline.train.log import RunLog, scalars, start_lines
from tec_pipeline.train.loop import (PRECISIONS, LoopSettings, Run, TECStep, compiled, end_run, last_step,
                                     make_accelerator, prepare, progress, resume_run, train_tec)
from tec_pipeline.train.model import check_arch_sizes, effective_targets, new_model, step_graph
from tec_pipeline.train.monitor import PICTURE, Monitor, base_loader
from tec_pipeline.train.schedule import make_schedule, param_groups


def run_train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
              reader: Optional[TargetReader] = None) -> dict:
    """Train (or resume) one run into ``cfg.output``; returns the last step's losses and the paths.

    `stop_after` ends the process after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule.
    `reader` is an already opened cache to use instead of ``cache.path``.
    """
    record = to_dict(cfg)  # the config as the run records it: config.json, checkpoints, trackers
    settings = flatten(record)  # the same, dotted: its identity and the checks that name a setting
    path = run_dir(cfg.output, settings, resume)
    check_arch_sizes(settings, cfg.targets.source)
    accelerator = make_accelerator(cfg.optim.mixed_precision, cfg.optim.accum_steps, path)
    precision = PRECISIONS[cfg.optim.mixed_precision]
    try:
        data = open_data(cfg, reader=reader, device=accelerator.device, precision=precision)
        model, kwargs = new_model(cfg, data)
        run = prepare_run(cfg, accelerator, model, kwargs, data, path, record)
        m = cfg.train.monitor
        monitor = Monitor(m, accelerator, model.encoder, base_loader(cfg, data), run.schedule.total_steps,
                          run.schedule.steps_per_epoch, str(path / PICTURE)) if m.train or m.val else None
        identity = run_identity(settings, data.identity, cached=data.source == "cache", renderer=data.loader)
        if resume:
            state = resume_run(run, identity)
            if monitor is not None:
                monitor.load_state(state.get("monitor"), run.step)
        if accelerator.is_main_process:
            write_start(path, record, identity, model, data, run)
        accelerator.init_trackers("tec", config=scalars(settings))
        log, end = RunLog(path, accelerator, run.step), last_step(run, stop_after)
        if monitor is not None:
            monitor.start(model, run.step, log)
        step = TECStep(losses=compiled(tec_losses, cfg.train.compile, accelerator, step_graph(cfg)),
                       targets=effective_targets(cfg), mask_ratio=cfg.model.mask_ratio, precision=precision)
        with progress(run, f"train {data.source}") as bar:
            last = train_tec(run, data, step, run_batches(cfg, data, run), monitor, end, log, bar) or log.last_losses()
    finally:
        end_run(accelerator)
    return {"step": run.step, "losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "output": str(path), "checkpoint": str(run.ckpt_path), "finished": run.step >= run.schedule.total_steps}


def prepare_run(cfg: Config, accelerator: Accelerator, model: TECModel, kwargs: dict, data: TrainData,
                path: Path, record: dict) -> Run:
    """The Tab. 8 schedule, AdamW's groups, accelerate's preparation, and what each checkpoint stores."""
    schedule = make_schedule(cfg, data.usable_images, accelerator.num_processes, cfg.train.max_steps)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_tokens), lr=schedule.lr,
                                  betas=(o.beta1, o.beta2), fused=accelerator.device.type == "cuda" or None)
    prepared, optimizer = prepare(accelerator, model, optimizer)
    if data.base is not None:
        data.base.to(accelerator.device)
    loop = LoopSettings(accum_steps=o.accum_steps, min_lr=o.min_lr, log_every=cfg.train.log_every,
                        checkpoint_every=cfg.train.checkpoint_every)
    stored = {"model_kwargs": kwargs, "schedule": asdict(schedule), "config": record}
    return Run(accelerator=accelerator, model=prepared, optimizer=optimizer, schedule=schedule, settings=loop,
               ckpt_path=path / CHECKPOINT, stored=stored)


def write_start(path: Path, record: dict, identity: dict, model: TECModel, data: TrainData, run: Run) -> None:
    """The cached run's reuse line, then the run's identity, config and parameter counts."""
    for line in start_lines(data.source, run.schedule.total_steps, run.schedule.effective_batch, data.usable_images,
                            data.views):
        print(line)
    write_json(path / IDENTITY_FILE, identity, "the run's identity")
    write_json(path / "config.json", record, "the run's config")
    write_json(path / "params.json", count_parameters(model), "the run's parameter counts")


def run_batches(cfg: Config, data: TrainData, run: Run):
    """One loader for the rest of the run, from the run's step on: its workers plan and read each
    epoch as they reach it, so an epoch boundary costs no restart."""
    d, acc, s = cfg.data, run.accelerator, run.schedule
    planner = EpochPlanner(data.shards, data.valid, cfg.seed, d.buffer_shards, data.views, d.view_mode, d.batch_size,
                           acc.num_processes, acc.process_index, s.batches_per_epoch)
    masks = partial(mask_noise, cfg.seed, batch=d.batch_size, num_patches=data.spec.num_patches)
    micro = run.step * run.settings.accum_steps
    batches = PlannedBatches(planner, s.batches_per_epoch, data.make_batch, micro,
                             s.total_steps * run.settings.accum_steps, masks)
    return batch_loader(batches, d.num_workers, torch.cuda.is_available(), threads=data.loader == "dali",
                        prefetch=d.prefetch_batches)

