"""Stage two, `tec-pipeline train`: train the new model from the target cache (or online, or on
pixels) with accelerate.

A driver: the pieces live in `tec_pipeline.train` (data and model from the config, epoch order
and masks, batches, the Tab. 8 schedule, checkpoints and identity, logs) and `tec_pipeline.step`
(the losses). What this module adds is the loop: set up, resume, then micro-steps with lr per
iteration, logs and periodic atomic checkpoints until the schedule ends.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from tec_pipeline.config import Config, to_dict
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.files import write_json
from tec_pipeline.models.tec import TECModel, count_parameters
from tec_pipeline.step import tec_losses
from tec_pipeline.train.batches import TargetReader, epoch_loader
from tec_pipeline.train.checkpoint import (IDENTITY_FILE, check_resumable, restore, run_dir, run_identity,
                                           save_state)
from tec_pipeline.train.log import Meter, RunLog, check_finite_losses, logged_losses, scalars, tracker
from tec_pipeline.train.order import epoch_order, mask_noise, plan_epoch, view_indices
from tec_pipeline.train.pipeline import DataPipeline, effective_targets, new_model, open_data, step_targets
from tec_pipeline.train.schedule import Schedule, make_schedule, param_groups, set_lr
from tec_pipeline.views import normalize


@dataclass
class Run:
    """Everything a training run holds while it trains."""

    cfg: Config
    accelerator: Accelerator
    data: DataPipeline
    model: torch.nn.Module  # as prepared by accelerate
    inner: TECModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    kwargs: dict  # `TECModel` arguments, stored in each checkpoint
    ckpt_path: Path
    step: int = 0
    last_saved: int = -1


def make_accelerator(cfg: Config, path: Path) -> Accelerator:
    try:
        return Accelerator(mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.accum_steps,
                           log_with=tracker(), project_dir=str(path))
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"optim.mixed_precision={cfg.optim.mixed_precision}: {str(err).splitlines()[0]}") from None


def setup_run(cfg: Config, accelerator: Accelerator, path: Path, reader: Optional[TargetReader]) -> Run:
    """Targets, model (checked against what the targets can serve), AdamW groups and schedule."""
    data = open_data(cfg, reader=reader)
    model, kwargs = new_model(cfg, data)
    schedule = make_schedule(cfg, data.usable_images, accelerator.num_processes, cfg.train.max_steps)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_tokens), lr=schedule.lr,
                                  betas=(o.beta1, o.beta2))
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if data.base is not None:
        data.base.to(accelerator.device)
    return Run(cfg, accelerator, data, prepared, model, optimizer, schedule, kwargs, path / CHECKPOINT)


def epoch_batches(run: Run, micro: int):
    """The loader of the epoch that micro-batch `micro` falls in, started at that batch."""
    cfg, acc, per_epoch = run.cfg, run.accelerator, run.schedule.batches_per_epoch
    epoch, start = divmod(micro, per_epoch)
    order = epoch_order(run.data.shards, run.data.valid, cfg.seed, epoch, cfg.data.buffer_shards)
    views = view_indices(order, cfg.seed, epoch, run.data.views, cfg.data.view_mode)
    plan = plan_epoch(order, views, cfg.data.batch_size, acc.num_processes, acc.process_index, per_epoch,
                      first_micro=epoch * per_epoch)
    masks = partial(mask_noise, cfg.seed, batch=cfg.data.batch_size, num_patches=run.data.spec.num_patches)
    return epoch_loader(plan, run.data.make_batch, start, cfg.data.num_workers, torch.cuda.is_available(), masks)


class _Forward:
    """What `step.tec_losses` needs of the model: the prepared forward, the inner model's branches."""

    def __init__(self, prepared, inner: TECModel):
        self.prepared, self.attn_branch = prepared, inner.attn_branch

    def __call__(self, *args, **kwargs):
        return self.prepared(*args, **kwargs)


def micro_step(run: Run, batch: dict) -> dict[str, float]:
    """Targets, Eq. 3 + 4, finite check, backward; the prepared optimizer steps once per accumulation cycle."""
    acc, t = run.accelerator, effective_targets(run.cfg)
    with acc.accumulate(run.model):
        images = normalize(batch["images"].to(acc.device, non_blocking=True))
        targets = step_targets(run.data, batch, images, t, run.inner.encoder.patch_embed.patch_size[0], acc.autocast())
        noise = batch["mask_noise"].to(acc.device, non_blocking=True)
        losses = tec_losses(_Forward(run.model, run.inner), images, targets, t, run.cfg.model.mask_ratio, noise)
        values = logged_losses(acc, losses)
        check_finite_losses(values, run.step, run.ckpt_path, run.last_saved)
        acc.backward(losses["loss"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return values


def train_until(run: Run, end: int, log: RunLog, bar) -> dict:
    """Optimizer steps until `end`: lr per iteration, logs, periodic atomic checkpoints."""
    cfg, accum, meter, last = run.cfg, run.cfg.optim.accum_steps, Meter(), {}
    micro = run.step * accum
    while run.step < end:
        fetch = time.perf_counter()
        for batch in epoch_batches(run, micro):
            meter.waited += time.perf_counter() - fetch
            if micro % accum == 0:
                set_lr(run.optimizer, run.schedule.lr_at(run.step, cfg.optim.min_lr))
            values = micro_step(run, batch)
            micro += 1
            meter.add(values, batch["images"].shape[0] * run.accelerator.num_processes, accum)
            if micro % accum == 0:
                run.step += 1
                if run.step % cfg.train.log_every == 0 or run.step == end:
                    last = meter.record(run.step, micro / run.schedule.batches_per_epoch,
                                        run.optimizer.param_groups[0]["lr"])
                    log.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    img_s=f"{last['images_per_s']:.1f}")
                meter.sums = {}
                bar.update(1)
                if run.step % cfg.train.checkpoint_every == 0 or run.step == end:
                    save_state(run.ckpt_path, run.accelerator, run.model, run.optimizer, run.step, run.kwargs,
                               cfg, run.schedule)
                    run.last_saved = run.step
                if run.step >= end:
                    break
            fetch = time.perf_counter()
    return last


def run_train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
              reader: Optional[TargetReader] = None) -> dict:
    """Train (or resume) one run into ``cfg.output``; returns the last step's losses and the paths.

    `stop_after` ends the process after that many optimizer steps in total, as an
    interruption would (a checkpoint is saved); ``--resume`` then continues the same schedule.
    `reader` is an already opened cache to use instead of ``cache.path``.
    """
    path = run_dir(cfg, resume)
    accelerator = make_accelerator(cfg, path)
    try:
        run = setup_run(cfg, accelerator, path, reader)
        identity = run_identity(cfg, run.data.identity, cached=run.data.source == "cache")
        if resume:
            check_resumable(path, identity)
            run.step = run.last_saved = restore(run.ckpt_path, accelerator, run.model, run.optimizer)
        if accelerator.is_main_process:
            write_json(path / IDENTITY_FILE, identity, "the run's identity")
            write_json(path / "config.json", to_dict(cfg), "the run's config")
            write_json(path / "params.json", count_parameters(run.inner), "the run's parameter counts")
        accelerator.init_trackers("tec", config=scalars(cfg))
        log = RunLog(path, accelerator, run.step)
        total = run.schedule.total_steps
        end = min(total, stop_after) if stop_after is not None else total
        with tqdm(total=total, initial=run.step, desc=f"train {run.data.source}", unit="step",
                  disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
            last = train_until(run, end, log, bar) or log.last()  # log.last(): resumed an already finished run
    finally:
        accelerator.end_training()
        # Let a later run in this process pick another mixed precision (ablations, tests):
        # accelerate keeps its state process-wide otherwise.
        AcceleratorState._reset_state()
    return {"step": run.step, "losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "output": str(path), "checkpoint": str(run.ckpt_path), "finished": run.step >= total}
