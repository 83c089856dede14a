"""The training loop of both `train` and `finetune`: micro-batches with gradient accumulation, the
lr set per iteration (Tab. 8 / Tab. 10 schedules), logs, atomic checkpoints, and a resume that
continues at any optimizer step as if never stopped.

A stage describes its run as a `LoopRun` (what to load, what loss a batch gives, how to save)
and hands it to `run_loop`; everything else is here, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from .log import Meter, RunLog, tracker
from .schedule import Schedule, set_lr


def make_accelerator(mixed_precision: str, accum_steps: int, path: Path) -> Accelerator:
    """accelerate for one run. accelerate keeps one mixed precision per process, so a run asking
    for another precision than an earlier run of this process is refused in one line."""
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accum_steps,
                           log_with=tracker(), project_dir=str(path))
    except ValueError as err:  # fp16 without a GPU, or a second precision in one process
        reason = str(err).splitlines()[0]
        if "already been initialized" in reason:
            reason = "an earlier run in this process trained in another precision; run this one in its own process"
        raise UserError(f"optim.mixed_precision={mixed_precision}: {reason}") from None


def end_run(accelerator: Accelerator) -> None:
    """accelerate's `end_training` less its teardown of the process group: one process may train
    run after run on the same group (`ablate` under ``accelerate launch``, each row then its
    fine-tune), and a group torn down after the first would fail the second. The command line
    closes the group when its command ends (`cli.guard`)."""
    for t in accelerator.trackers:
        t.finish()


PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # optim.mixed_precision -> autocast dtype


def prepare(accelerator: Accelerator, model: torch.nn.Module, *rest):
    """`accelerator.prepare(model, *rest)`, less the autocast accelerate puts around the model's
    forward. accelerate makes that autocast object anew for every run and stores it on the model
    instance; a compiled step is guarded on its identity, so each run in a process compiled the
    step again and the dead runs' entries counted towards torch's recompile limit. The steps apply
    the run's precision themselves instead (`PRECISIONS`, `base_targets.autocast`), from constants,
    so two runs with the same graph share one compiled step. ``_original_forward`` goes too: it is
    what accelerate's unwrap would put back, and there is nothing to put back."""
    prepared = accelerator.prepare(model, *rest)
    vars(model).pop("forward", None)
    vars(model).pop("_original_forward", None)
    return prepared


# The step graphs compiled since torch's compile caches were last cleared, as (function, graph).
# torch keeps at most 8 compiled entries per function (its default recompile limit) and counts the
# entries of finished runs too; a process that trains run after run (`ablate`) clears the caches
# once it holds `HELD_GRAPHS` graphs, well before a ninth could hit that limit, and reuses what it
# holds for a graph it has seen.
_HELD: list[tuple[str, str]] = []
HELD_GRAPHS = 4  # under torch's 8, with room for the recompiles a graph may need on its own (DDP's parts)


def compiled(fn: Callable, setting: Optional[bool], accelerator: Accelerator, graph: str) -> Callable:
    """`fn` through `torch.compile` when ``train.compile`` asks for it (None: on CUDA only, where
    fusing the step's kernels pays for the compile time). Without DDP the step must be one graph
    (``fullgraph``: a graph break is an error, not a silent slowdown); under DDP (several
    processes, or one launched as a group) dynamo runs DDP's own forward uncompiled (its hooks),
    compiles the model inside it split at the gradient buckets, and the losses after it as a
    graph of their own.

    `graph` names what the compiled graph depends on (`train.model.step_graph`): a run whose
    graph this process compiled already reuses it; a new one may first clear torch's caches
    (`_HELD`), so any number of runs in one process stays under torch's recompile limit."""
    on = accelerator.device.type == "cuda" if setting is None else setting
    if not on:
        return fn
    held = (fn.__qualname__, f"{graph}|{accelerator.num_processes}|{accelerator.device.type}")
    if held not in _HELD:
        if len(_HELD) >= HELD_GRAPHS:
            torch.compiler.reset()
            _HELD.clear()
        _HELD.append(held)
    return torch.compile(fn, fullgraph=accelerator.distributed_type == DistributedType.NO)


@dataclass(kw_only=True)
class LoopSettings:
    accum_steps: int
    min_lr: float
    log_every: int
    checkpoint_every: int


@dataclass(kw_only=True)
class LoopRun:
    """What the loop drives. A stage fills the fields and implements `loader`, `losses` and `save`;
    `start`, `after_step` and `save_due` have defaults."""

    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer  # as prepared by accelerate
    schedule: Schedule
    settings: LoopSettings
    ckpt_path: Path
    step: int = 0  # optimizer steps done
    last_saved: int = -1  # the step of the last checkpoint written, -1 before the first

    def loader(self, micro: int) -> Iterable:
        """This process's batches from micro-batch `micro` on: the rest of its epoch or of the run
        (the loop asks again, from where it is, when they run out)."""
        raise NotImplementedError

    def losses(self, batch, micro: int) -> tuple[dict[str, Tensor], int]:
        """(loss terms, images in the batch) of one micro-batch; the term "loss" is minimized."""
        raise NotImplementedError

    def save(self) -> None:
        """Write the checkpoint of step `self.step` (atomically)."""
        raise NotImplementedError

    def start(self, log: RunLog) -> None:
        """Called once before this process's first step, the log open (e.g. scoring the starting weights)."""

    def after_step(self, log: RunLog) -> None:
        """Called after every optimizer step, before the checkpoint (e.g. an evaluation)."""

    def save_due(self, end: int) -> bool:
        return self.step % self.settings.checkpoint_every == 0 or self.step == end


def micro_step(run: LoopRun, meter: Meter, batch, micro: int) -> None:
    """Losses (kept on the device by `meter`), backward; the prepared optimizer steps once per
    accumulation cycle. Nothing here waits for the device."""
    acc = run.accelerator
    with acc.accumulate(run.model):
        losses, images = run.losses(batch, micro)
        meter.add(losses, run.step + 1, images * acc.num_processes, run.settings.accum_steps)
        acc.backward(losses["loss"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)


def end_step(run: LoopRun, meter: Meter, lr: float, epoch: float, end: int, log: RunLog, bar) -> Optional[dict]:
    """One optimizer step is done: its record (every ``log_every`` steps and at `end`), the
    stage's `after_step`, and a checkpoint when due. Records and checkpoints are the only places
    the loop reads the device, and a non-finite loss since the last of them stops the run there,
    before anything is saved."""
    record, log_due, save_due = None, run.step % run.settings.log_every == 0 or run.step == end, run.save_due(end)
    if log_due or save_due:
        meter.check_finite(run.ckpt_path, run.last_saved)
    if log_due:
        record = meter.record(run.step, epoch, lr)
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
    meter.next_step()
    bar.update(1)
    paused = time.perf_counter()
    run.after_step(log)
    meter.start += time.perf_counter() - paused  # an evaluation's time is not the training's throughput
    if save_due:
        run.save()
        run.last_saved = run.step
    return record


def train_until(run: LoopRun, end: int, log: RunLog, bar) -> dict:
    """Optimizer steps until `end`; the last record written ({} when none was)."""
    accum, schedule, meter, last = run.settings.accum_steps, run.schedule, Meter(run.accelerator), {}
    micro = run.step * accum
    while run.step < end:
        fetch = time.perf_counter()
        for batch in run.loader(micro):
            meter.waited += time.perf_counter() - fetch
            lr = schedule.lr_at(run.step, run.settings.min_lr)
            if micro % accum == 0:
                set_lr(run.optimizer, lr)  # times each group's lr_scale, where it has one
            micro_step(run, meter, batch, micro)
            micro += 1
            if micro % accum == 0:
                run.step += 1
                last = end_step(run, meter, lr, micro / schedule.batches_per_epoch, end, log, bar) or last
                if run.step >= end:
                    break
            fetch = time.perf_counter()
    return last


def run_loop(run: LoopRun, path: Path, stop_after: Optional[int], desc: str) -> dict:
    """Train from `run.step` to the schedule's end (or to `stop_after` steps in total, as an
    interruption would) with a progress bar; the last log record (read back when the run had
    already finished)."""
    log, total = RunLog(path, run.accelerator, run.step), run.schedule.total_steps
    end = min(total, stop_after) if stop_after is not None else total
    run.start(log)
    with tqdm(total=total, initial=run.step, desc=desc, unit="step",
              disable=not run.accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        return train_until(run, end, log, bar) or log.last_losses()

