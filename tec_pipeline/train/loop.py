"""Stage two's training loop, as MAE's `train_one_epoch` reads: one visible loop over the run's
micro-batches (read targets -> render views -> forward -> losses -> backward -> log), with the lr
set per iteration (Tab. 8), gradient accumulation, the monitor's evaluations, atomic checkpoints,
and a resume that continues at any optimizer step as if never stopped. Fine-tuning's loop
(`finetune.loop`) is built from the same pieces: `Run`, `start_micro_batch`, `backward`,
`end_step`, `save_due`.

Also the run's accelerate set-up: the accelerator, `prepare` (less accelerate's autocast), the
step's compilation under torch's recompile limit, and the end of a run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor
from tqdm.auto import tqdm

from ..config import TargetConfig
from ..errors import UserError
from ..views import normalize
from .checkpoint import check_resumable, load_checkpoint, restore_state, save_state
from .data import TrainData
from .log import Meter, RunLog, tracker
from .monitor import Monitor
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
class Run:
    """What a loop drives, declared: the prepared model and optimizer, the schedule, where the
    checkpoint goes and what it stores beside the training state, and how far the run is."""

    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer  # as prepared by accelerate
    schedule: Schedule
    settings: LoopSettings
    ckpt_path: Path
    stored: dict = field(default_factory=dict)  # what each checkpoint keeps beside the training state
    step: int = 0  # optimizer steps done
    last_saved: int = -1  # the step of the last checkpoint written, -1 before the first


@dataclass(frozen=True)
class TECStep:
    """What every TEC step computes with, fixed for the run."""

    losses: Callable[..., dict[str, Tensor]]  # `step.tec_losses`, compiled with train.compile
    targets: TargetConfig  # the settings the run trains with (`model.effective_targets`)
    mask_ratio: float
    precision: Optional[torch.dtype]  # the forward's autocast dtype (`PRECISIONS`), None: float32


def train_tec(run: Run, data: TrainData, step: TECStep, batches: Iterable[dict], monitor: Optional[Monitor],
              end: int, log: RunLog, bar) -> dict:
    """Optimizer steps from `run.step` to `end` over `batches` (the loader from that step on): per
    micro-batch the cached targets and the views, the masked forward and Eq. 3 + 4, the backward;
    per optimizer step its record, the monitor's evaluation and the checkpoint, when due. Returns
    the last record written ({} when none was). Nothing but records and checkpoints reads the device."""
    acc, accum, meter, last = run.accelerator, run.settings.accum_steps, Meter(run.accelerator), {}
    micro, fetch = run.step * accum, time.perf_counter()
    for batch in batches:  # "index", "crop" (B, 5), "mask_noise" (B, L), cached targets in their stored dtypes
        meter.waited += time.perf_counter() - fetch
        lr = start_micro_batch(run, micro)
        images = normalize(data.views_of(batch))  # (B, 3, S, S) float32 on the device
        targets = data.targets_of(batch, images)  # float32: feat (B, L, C), attention rows (B, H, k+1, L)
        noise = batch["mask_noise"].to(acc.device, non_blocking=True)  # (B, L): the masks
        with acc.accumulate(run.model):
            losses = step.losses(run.model, images, targets, step.targets, step.mask_ratio, noise, step.precision)
            backward(run, meter, losses, images.shape[0])
        micro += 1
        if micro % accum == 0:
            run.step += 1
            saving = save_due(run, end)
            last = end_step(run, meter, lr, micro / run.schedule.batches_per_epoch, end, saving, log, bar) or last
            if monitor is not None and monitor.due(run.step):
                watch(run, monitor, meter, log)
            if saving:
                save(run, {"monitor": monitor.state()} if monitor is not None else {})
            if run.step >= end:
                break
        fetch = time.perf_counter()
    return last


def last_step(run: Run, stop_after: Optional[int]) -> int:
    """Where this process stops: the schedule's end, or `stop_after` steps in total (as an interruption would)."""
    return min(run.schedule.total_steps, stop_after) if stop_after is not None else run.schedule.total_steps


def progress(run: Run, desc: str) -> tqdm:
    """The run's progress bar over its optimizer steps (the main process's, on each machine)."""
    return tqdm(total=run.schedule.total_steps, initial=run.step, desc=desc, unit="step",
                disable=not run.accelerator.is_local_main_process, dynamic_ncols=True)


def start_micro_batch(run: Run, micro: int) -> float:
    """The lr of the step micro-batch `micro` belongs to, set on the optimizer when it opens the step."""
    lr = run.schedule.lr_at(run.step, run.settings.min_lr)
    if micro % run.settings.accum_steps == 0:
        set_lr(run.optimizer, lr)  # times each group's lr_scale, where it has one
    return lr


def backward(run: Run, meter: Meter, losses: dict[str, Tensor], images: int) -> None:
    """Inside ``accelerator.accumulate``: the terms kept on the device by `meter`, the backward of
    ``loss``; the prepared optimizer steps (and zeroes) once per accumulation cycle."""
    meter.add(losses, run.step + 1, images * run.accelerator.num_processes, run.settings.accum_steps)
    run.accelerator.backward(losses["loss"])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def end_step(run: Run, meter: Meter, lr: float, epoch: float, end: int, saving: bool, log: RunLog,
             bar) -> Optional[dict]:
    """One optimizer step is done: its record every ``log_every`` steps and at `end`. Records and
    checkpoints (`saving`: this step's is due) are the only places the loop reads the device, and
    a non-finite loss since the last of them stops the run there, before anything is saved."""
    record, logging = None, run.step % run.settings.log_every == 0 or run.step == end
    if logging or saving:
        meter.check_finite(run.ckpt_path, run.last_saved)
    if logging:
        record = meter.record(run.step, epoch, lr)
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
    meter.next_step()
    bar.update(1)
    return record


def save_due(run: Run, end: int) -> bool:
    return run.step % run.settings.checkpoint_every == 0 or run.step == end


def save(run: Run, extra: dict, what: str = "the training checkpoint") -> None:
    """The checkpoint of step `run.step`, atomically: training state, `run.stored` and `extra`."""
    save_state(run.ckpt_path, run.accelerator, run.model, run.optimizer, run.step, {**run.stored, **extra}, what)
    run.last_saved = run.step


def resume_run(run: Run, identity: dict) -> dict:
    """Continue the run from its checkpoint: refused if its `identity` changed (`check_resumable`),
    then the model, optimizer, rng and step restored. Returns the checkpoint, for what else it keeps."""
    check_resumable(run.ckpt_path.parent, identity)
    state = load_checkpoint(run.ckpt_path)
    run.step = run.last_saved = restore_state(state, run.accelerator, run.model, run.optimizer, run.ckpt_path)
    return state


def watch(run: Run, monitor: Monitor, meter: Meter, log: RunLog) -> None:
    """The monitor's evaluation (its time is not the training's throughput); on its guard's
    warning with ``train.monitor.stop_on_drop``, the checkpoint, then the stop (before the end)."""
    with meter.paused():
        warning = monitor.evaluate(run.accelerator.unwrap_model(run.model), run.step, log)
    if warning and monitor.cfg.stop_on_drop and run.step < run.schedule.total_steps:
        save(run, {"monitor": monitor.state()})
        raise monitor.stop(warning, run.step, run.ckpt_path)
