"""Stage two, `tec-pipeline train`: train the new model from the target cache (or online, or on
pixels) with accelerate.

A driver: the pieces live in `tec_pipeline.train` (data and model from the config, epoch order
and masks, batches, the Tab. 8 schedule, checkpoints and identity, the loop, the monitor) and
`tec_pipeline.step` (the losses). What this module adds is what one TEC step is, when the run is
watched (``train.monitor``), and the order: set up, resume, write the run's identity, run the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from tec_pipeline.config import Config, to_dict
from tec_pipeline.export import CHECKPOINT, load_checkpoint
from tec_pipeline.files import write_json
from tec_pipeline.models.tec import TECModel, count_parameters
from tec_pipeline.step import tec_losses
from tec_pipeline.train.reuse import start_lines
from tec_pipeline.train.checkpoint import (IDENTITY_FILE, check_resumable, restore_state, run_dir, run_identity,
                                           save_state)
from tec_pipeline.train.data import DataPipeline, open_data, step_targets
from tec_pipeline.train.interfaces import TargetReader
from tec_pipeline.train.loader import PlannedBatches, batch_loader
from tec_pipeline.train.log import RunLog, scalars
from tec_pipeline.train.loop import (PRECISIONS, LoopRun, LoopSettings, compiled, end_run, make_accelerator, prepare,
                                     run_loop)
from tec_pipeline.train.model import effective_targets, new_model, step_graph
from tec_pipeline.train.monitor import PICTURE, Monitor, base_loader
from tec_pipeline.train.order import EpochPlanner, mask_noise
from tec_pipeline.train.schedule import make_schedule, param_groups
from tec_pipeline.views import normalize


@dataclass(kw_only=True)
class TECRun(LoopRun):
    """A TEC (or MAE) pre-training run: the loop's run plus its data and model arguments."""

    cfg: Config
    data: DataPipeline
    inner: TECModel  # the model before accelerate wrapped it
    kwargs: dict  # `TECModel` arguments, stored in each checkpoint
    step_losses: Callable = tec_losses  # `tec_losses`, compiled with train.compile
    monitor: Optional[Monitor] = None  # train.monitor: the encoder scored against its base while it trains

    def loader(self, micro: int):
        """One loader for the rest of the run, from micro-batch `micro`: its workers plan and read
        each epoch as they reach it, so an epoch boundary costs no restart."""
        cfg, acc, s = self.cfg, self.accelerator, self.schedule
        planner = EpochPlanner(self.data.shards, self.data.valid, cfg.seed, cfg.data.buffer_shards, self.data.views,
                               cfg.data.view_mode, cfg.data.batch_size, acc.num_processes, acc.process_index,
                               s.batches_per_epoch)
        masks = partial(mask_noise, cfg.seed, batch=cfg.data.batch_size, num_patches=self.data.spec.num_patches)
        batches = PlannedBatches(planner, s.batches_per_epoch, self.data.make_batch, micro,
                                 s.total_steps * self.settings.accum_steps, masks)
        return batch_loader(batches, cfg.data.num_workers, torch.cuda.is_available(), threads=self.data.loader == "dali",
                            prefetch=cfg.data.prefetch_batches)

    def losses(self, batch: dict, micro: int):
        """Targets of the batch (cached, online or pixels), then Eq. 3 + 4 on the masked views."""
        acc, t = self.accelerator, effective_targets(self.cfg)
        images = normalize(self.data.images(batch, acc.device))
        patch = self.inner.encoder.patch_embed.patch_size[0]
        targets = step_targets(self.data, batch, images, t, patch, acc.autocast())
        noise = batch["mask_noise"].to(acc.device, non_blocking=True)
        losses = self.step_losses(self.model, images, targets, t, self.cfg.model.mask_ratio, noise,
                                  PRECISIONS[self.cfg.optim.mixed_precision])
        return losses, images.shape[0]

    def start(self, log: RunLog) -> None:
        """The monitor's base score and starting point (where the history has none yet)."""
        if self.monitor is not None:
            self.monitor.start(self.inner, self.step, log)

    def after_step(self, log: RunLog) -> None:
        """At the monitor's interval: score the encoder; on the guard's warning with
        ``train.monitor.stop_on_drop``, write the checkpoint and stop (before the schedule's end)."""
        if self.monitor is None or not self.monitor.due(self.step):
            return
        warning = self.monitor.evaluate(self.inner, self.step, log)
        if warning and self.cfg.train.monitor.stop_on_drop and self.step < self.schedule.total_steps:
            self.save()
            self.last_saved = self.step
            raise self.monitor.stop(warning, self.step, self.ckpt_path)

    def save(self) -> None:
        extra = {"monitor": self.monitor.state()} if self.monitor is not None else None
        save_state(self.ckpt_path, self.accelerator, self.model, self.optimizer, self.step, self.kwargs, self.cfg,
                   self.schedule, extra)


def setup_run(cfg: Config, accelerator: Accelerator, path: Path, reader: Optional[TargetReader]) -> TECRun:
    """Targets, model (checked against what the targets can serve), AdamW groups and schedule."""
    data = open_data(cfg, reader=reader, device=accelerator.device)
    model, kwargs = new_model(cfg, data)
    schedule = make_schedule(cfg, data.usable_images, accelerator.num_processes, cfg.train.max_steps)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_tokens), lr=schedule.lr,
                                  betas=(o.beta1, o.beta2), fused=accelerator.device.type == "cuda" or None)
    prepared, optimizer = prepare(accelerator, model, optimizer)
    if data.base is not None:
        data.base.to(accelerator.device)
    settings = LoopSettings(accum_steps=o.accum_steps, min_lr=o.min_lr, log_every=cfg.train.log_every,
                            checkpoint_every=cfg.train.checkpoint_every)
    m = cfg.train.monitor
    monitor = Monitor(m, accelerator, model.encoder, base_loader(cfg, data), schedule.total_steps,
                      schedule.steps_per_epoch, str(path / PICTURE)) if m.train or m.val else None
    return TECRun(accelerator=accelerator, model=prepared, optimizer=optimizer, schedule=schedule, settings=settings,
                  ckpt_path=path / CHECKPOINT, cfg=cfg, data=data, inner=model, kwargs=kwargs,
                  step_losses=compiled(tec_losses, cfg.train.compile, accelerator, step_graph(cfg)),
                  monitor=monitor)


def run_train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
              reader: Optional[TargetReader] = None) -> dict:
    """Train (or resume) one run into ``cfg.output``; returns the last step's losses and the paths.

    `stop_after` ends the process after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule.
    `reader` is an already opened cache to use instead of ``cache.path``.
    """
    path = run_dir(cfg, resume)
    accelerator = make_accelerator(cfg.optim.mixed_precision, cfg.optim.accum_steps, path)
    try:
        run = setup_run(cfg, accelerator, path, reader)
        identity = run_identity(cfg, run.data.identity, cached=run.data.source == "cache", renderer=run.data.loader)
        if resume:
            check_resumable(path, identity)
            state = load_checkpoint(run.ckpt_path)
            run.step = run.last_saved = restore_state(state, accelerator, run.model, run.optimizer, run.ckpt_path)
            if run.monitor is not None:
                run.monitor.load_state(state.get("monitor"), run.step)
        if accelerator.is_main_process:
            for line in start_lines(run.data.source, run.schedule.total_steps, run.schedule.effective_batch,
                                    run.data.usable_images, run.data.views):
                print(line)
            write_json(path / IDENTITY_FILE, identity, "the run's identity")
            write_json(path / "config.json", to_dict(cfg), "the run's config")
            write_json(path / "params.json", count_parameters(run.inner), "the run's parameter counts")
        accelerator.init_trackers("tec", config=scalars(cfg))
        last = run_loop(run, path, stop_after, desc=f"train {run.data.source}")
    finally:
        end_run(accelerator)
    return {"step": run.step, "losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "output": str(path), "checkpoint": str(run.ckpt_path), "finished": run.step >= run.schedule.total_steps}
