"""Stage two: train the new model from the target cache (or online, or on pixels) with accelerate.

Orchestration only: the pieces live in `tec_pipeline` (data order and readers in
`train_data`, the step's losses in `step`, the Tab. 8 schedule in `schedule`, checkpoints
and export in `export`). This module wires them into a loop with resume, logs and progress.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from tec_pipeline.cache.schema import first_difference, short_value
from tec_pipeline.config import Config, TrainConfig, flatten, load_config, to_dict
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json
from tec_pipeline.export import CHECKPOINT, atomic_save, build_model, load_checkpoint
from tec_pipeline.models.base import file_sha256, load_base_model, read_checkpoint
from tec_pipeline.models.tec import TECModel, count_parameters
from tec_pipeline.pixels import pixel_feat_dim, pixel_targets
from tec_pipeline.schedule import lr_at, param_groups, scaled_lr, set_lr
from tec_pipeline.step import tec_losses
from tec_pipeline.targets import attention_rows
from tec_pipeline.base_targets import compute_targets
from tec_pipeline.train_data import (
    CachedBatches, OnlineBatches, TargetReader, TargetSpec, base_spec, batch_targets, cache_image_source,
    cache_spec, check_cache_base, check_request, epoch_loader, epoch_order, mask_noise, open_image_source, plan_epoch,
    reader_shards, uniform_shards, valid_mask, view_indices,
)
from tec_pipeline.views import normalize

LOG_FILE = "log.jsonl"
IDENTITY_FILE = "identity.json"
# What a resume may change: where the run logs and writes, how fast it loads, and where its
# data lies (the data's identity is compared by content instead).
RESUMABLE_CHANGES = ("output", "train.log_every", "train.checkpoint_every", "data.num_workers", "data.path",
                     "cache.path")


# ---------------------------------------------------------------- targets and data
@dataclass
class DataPipeline:
    """Where a run's views and targets come from (cache, online base model, or pixels)."""

    source: str
    spec: TargetSpec
    shards: list
    valid: Optional[np.ndarray]
    views: int
    make_batch: object
    base: Optional[torch.nn.Module] = None
    meta: Optional[dict] = None  # the cache's metadata (cached runs)
    identity: object = None  # what the data is: the cache's identity, else the image folder's fingerprint


def open_data(cfg: Config, render: bool = True, reader: Optional[TargetReader] = None) -> DataPipeline:
    """Open the target source named by ``targets.source`` and the images its views are rendered from.

    `reader` replaces opening ``cache.path`` (an already opened cache, e.g. in memory).
    """
    t, d = cfg.targets, cfg.data
    rows = attention_rows(t.attention, t.k)
    if t.source == "cache":
        if reader is None:
            from tec_pipeline.cache.store import open_cache

            reader = open_cache(cfg.cache.path)
        if not reader.is_complete():
            raise UserError(f"cache.path={cfg.cache.path}: the cache is incomplete (finish stage one first)")
        source = cache_image_source(reader, d.path) if render else None
        make = CachedBatches(reader, source, d.img_size, rows, cfg.data.buffer_shards, render)
        check_cache_base(reader.meta, cfg.base.checkpoint)
        return DataPipeline("cache", cache_spec(reader.meta), reader_shards(reader), valid_mask(reader),
                            reader.views, make, meta=reader.meta, identity=reader.meta.get("identity"))
    source = open_image_source(d.kind, d.path)
    shards = uniform_shards(len(source), cfg.cache.images_per_shard)  # same order as a cache of this config
    make = OnlineBatches(source, d.img_size, cfg.seed, (d.scale_min, d.scale_max))
    if t.source == "online":
        base = load_base_model(cfg.base.arch, cfg.base.checkpoint, img_size=d.img_size)
        return DataPipeline("online", base_spec(base, d.img_size), shards, None, d.views, make, base,
                            identity=source.fingerprint())
    patch = _patch_size(cfg)
    L = (d.img_size // patch) ** 2
    return DataPipeline("pixels", TargetSpec(d.img_size, L, pixel_feat_dim(patch), 0, 0), shards, None, d.views, make,
                        identity=source.fingerprint())


def _patch_size(cfg: Config) -> int:
    from tec_pipeline.models.base import build_vit

    arch = cfg.model.arch
    return arch.patch_size or build_vit(replace(arch, img_size=cfg.data.img_size, depth=1)).patch_embed.patch_size[0]


def effective_targets(cfg: Config):
    """The target settings a run uses: pixels (MAE) have no attention target and no norm choice."""
    if cfg.targets.source == "pixels":
        return replace(cfg.targets, attention="none", norm="patch")
    return cfg.targets


# ---------------------------------------------------------------- model
def model_kwargs(cfg: Config, spec: TargetSpec) -> dict:
    """`TECModel` arguments for this run; stored in every checkpoint so export can rebuild it."""
    m, t = cfg.model, effective_targets(cfg)
    if m.arch.img_size is not None and m.arch.img_size != cfg.data.img_size:
        raise UserError(f"model.arch.img_size={m.arch.img_size} differs from data.img_size={cfg.data.img_size}")
    pixels = cfg.targets.source == "pixels"
    attn = t.attention != "none"
    return {
        "arch": asdict(replace(m.arch, img_size=cfg.data.img_size)),
        "feat_dim": spec.feat_dim,
        "attn_dim": spec.feat_dim if attn else 0,
        "attn_heads": spec.heads if attn else 0,
        "input_adapter": m.input_adapter and not pixels,  # MAE has no adapters
        "encoder_adapter": m.encoder_adapter and not pixels,
        "adapter_group": m.adapter_group,
        "decoder_dim": m.decoder_dim,
        "decoder_depth": m.decoder_depth,
        "decoder_heads": m.decoder_heads,
    }


@torch.no_grad()
def init_from_base(model: TECModel, checkpoint: str) -> int:
    """Tab. 6(d) "Load": copy the base encoder's weights where names and shapes match.

    The position embedding stays the fixed sin-cos one (it is not trained here).
    Returns the number of tensors copied.
    """
    sd, _, _ = read_checkpoint(checkpoint)
    copied = 0
    for name, value in model.encoder.state_dict().items():
        if name != "pos_embed" and name in sd and tuple(sd[name].shape) == tuple(value.shape):
            value.copy_(sd[name])
            copied += 1
    if copied == 0:
        raise UserError(f"model.init_from_base: no weight of base.checkpoint={checkpoint} fits the new encoder")
    return copied


def init_from_checkpoint(model: TECModel, path: str) -> None:
    """Start the whole model (encoder, adapters, decoder) from another run's weights.

    `path` is a run's checkpoint.pt or a .safetensors of the model's state dict (as
    `demo-base` ships); used by the demo's control to continue the base's own MAE run.
    """
    if not Path(path).is_file():
        raise UserError(f"model.init_checkpoint={path}: file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = load_checkpoint(Path(path)).get("model")
        if state is None:
            raise UserError(f"model.init_checkpoint={path}: not a tec-pipeline training checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        reason = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise UserError(f"model.init_checkpoint={path}: does not fit this model ({reason})") from None
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"model.init_checkpoint={path}: does not fit this model ({'missing' if missing else 'unexpected'} "
                        f"'{first}')")


# ---------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """Tab. 8 in optimizer steps: lr = blr * effective batch / 256, warmup then cosine."""

    batches_per_epoch: int  # micro-batches per epoch and process (a multiple of accum_steps)
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    warmup_steps: float
    lr: float
    effective_batch: int

    def lr_at(self, step: int, min_lr: float) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.lr, min_lr)


def make_schedule(cfg: Config, usable_images: int, num_processes: int, max_steps: Optional[int]) -> Schedule:
    o, batch = cfg.optim, cfg.data.batch_size
    effective = batch * o.accum_steps * num_processes
    steps_per_epoch = usable_images // effective
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size={batch}: {usable_images} usable images make no full effective batch "
                        f"of {effective} (batch x optim.accum_steps x processes)")
    total = max_steps if max_steps is not None else o.epochs * steps_per_epoch
    return Schedule(steps_per_epoch * o.accum_steps, steps_per_epoch, total,
                    o.warmup_epochs * steps_per_epoch, scaled_lr(o.blr, effective), effective)


# ---------------------------------------------------------------- logs
class RunLog:
    """Per-step records to ``RUN/log.jsonl`` (truncated to the resumed step) and accelerate trackers."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, resume_step: int):
        self.path, self.accelerator = run_dir / LOG_FILE, accelerator
        if accelerator.is_main_process:
            kept = []
            if resume_step and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def last(self) -> dict:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return json.loads(lines[-1]) if lines else {}

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _tracker() -> Optional[str]:
    """accelerate's TensorBoard tracker when either TensorBoard package is installed."""
    from importlib.util import find_spec

    return "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else None


def _scalars(cfg: Config) -> dict:
    """The config flattened to scalars (what TensorBoard's hparams accept)."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------- the loop
class _Forward:
    """What `step.tec_losses` needs of the model: the prepared forward, the inner model's branches."""

    def __init__(self, prepared, inner: TECModel):
        self.prepared, self.attn_branch = prepared, inner.attn_branch

    def __call__(self, *args, **kwargs):
        return self.prepared(*args, **kwargs)


def step_losses(data: DataPipeline, forward: _Forward, batch: dict, cfg: Config, accelerator: Accelerator,
                patch: int) -> dict[str, torch.Tensor]:
    """The losses of one micro-batch: targets from the cache, the base model or pixels, then Eq. 3 + 4."""
    device = accelerator.device
    images = normalize(batch["images"].to(device, non_blocking=True))
    t = effective_targets(cfg)
    if data.source == "cache":
        targets = batch_targets(batch, device)
    elif data.source == "online":
        with torch.no_grad(), accelerator.autocast():
            targets = compute_targets(data.base, images, t.last_layers, attention_rows(t.attention, t.k) - 1)
    else:
        targets = pixel_targets(images, patch)
    noise = batch["mask_noise"].to(device, non_blocking=True)
    return tec_losses(forward, images, targets, t, cfg.model.mask_ratio, noise)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, accelerator: Accelerator, model, optimizer, step: int, kwargs: dict,
               cfg: Config, schedule: Schedule) -> None:
    """Full training state, atomically: weights, AdamW moments, loss scaler, RNG, step (= data position)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "step": step,  # optimizer steps done; the data position is step x accum micro-batches
            "rng": _rng_state(),
            "model_kwargs": kwargs,
            "schedule": asdict(schedule),
            "config": to_dict(cfg),
        }
        atomic_save(state, path)


def _check_finite(values: dict[str, float], step: int, ckpt: Path, last_saved: int) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        kept = f"the last good checkpoint {ckpt} (step {last_saved}) is kept" if last_saved >= 0 else "no checkpoint was saved"
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UserError(f"step {step + 1}: non-finite loss ({terms}); training stopped, {kept}")


class Meter:
    """Loss terms of the current optimizer step, and throughput / data wait since the last record."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0

    def add(self, values: dict[str, float], images: int, accum: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / accum  # mean over the accumulated micro-batches
        self.images += images

    def record(self, step: int, epoch: float, lr: float) -> dict:
        elapsed = time.perf_counter() - self.start
        rec = {"step": step, "epoch": epoch, "lr": lr, **self.sums,
               "images_per_s": self.images / elapsed, "data_wait": self.waited / elapsed}
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0
        return rec


@dataclass
class Run:
    """Everything a training run holds while it trains."""

    cfg: Config
    settings: TrainConfig
    accelerator: Accelerator
    data: DataPipeline
    model: torch.nn.Module  # as prepared by accelerate
    inner: TECModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    kwargs: dict
    ckpt_path: Path
    step: int = 0
    last_saved: int = -1


def _run_dir(cfg: Config, resume: bool) -> Path:
    run_dir = Path(cfg.output)
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists() and not resume:
        raise UserError(f"output={run_dir} already holds a run; pass --resume to continue it or choose another output")
    if resume and not ckpt.exists():
        raise UserError(f"--resume: output={run_dir} has no checkpoint to continue from")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_identity(cfg: Config, data: DataPipeline) -> dict:
    """What a run's weights depend on: its config less `RESUMABLE_CHANGES`, the data it reads
    (`DataPipeline.identity`, so a rebuilt cache or image folder at the same path counts) and
    the checkpoints it starts from, by content. A cached run's base is already in the cache's
    identity (and `check_cache_base` holds base.checkpoint to it), so it is not hashed again."""
    config = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in RESUMABLE_CHANGES}
    base = None if data.source == "cache" else cfg.base.checkpoint
    starts = {name: file_sha256(path) for name, path in
              (("base.checkpoint", base), ("model.init_checkpoint", cfg.model.init_checkpoint))
              if path and Path(path).is_file()}
    # through JSON, as it is stored: tuples become lists, so a resume compares like with like
    return json.loads(json.dumps({"config": config, "data": data.identity, "checkpoint_sha256": starts}))


def check_resumable(run_dir: Path, identity: dict) -> None:
    """Refuse, naming the first differing setting, to continue a run whose config, data or
    starting weights have changed: its schedule and weights would silently mix two runs.

    Only what both identities record is compared: one written by another version of this
    code may record more or less (e.g. the base's hash, since dropped for cached runs), and
    that alone says nothing about the run.
    """
    path = run_dir / IDENTITY_FILE
    if not path.is_file():  # a run from before identities were recorded: nothing to compare
        return
    diff = first_difference(json.loads(path.read_text()), identity, shared_only=True)
    if diff is not None:
        key, was, now = diff
        key = key.removeprefix("config.")
        raise UserError(f"output={run_dir} was trained with {key}={short_value(was, now)}, this run has "
                        f"{short_value(now, was)}; resume with the same settings and data, or choose another output")


def _accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    try:
        return Accelerator(mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.accum_steps,
                           log_with=_tracker(), project_dir=str(run_dir))
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"optim.mixed_precision={cfg.optim.mixed_precision}: {str(err).splitlines()[0]}") from None


def setup_run(cfg: Config, accelerator: Accelerator, run_dir: Path, reader: Optional[TargetReader]) -> Run:
    """Targets, model (checked against what the targets can serve), AdamW groups and schedule."""
    data = open_data(cfg, reader=reader)
    t = effective_targets(cfg)
    kwargs = model_kwargs(cfg, data.spec)
    # Seeded right before the init, so whatever ran before (a base model build) cannot shift it;
    # data order and masks have their own seeded generators.
    set_seed(cfg.seed)
    model = build_model(kwargs)
    check_request(data.spec, img_size=cfg.data.img_size, num_patches=model.encoder.patch_embed.num_patches,
                  k=t.k, attention=t.attention, what="the cache" if data.source == "cache" else "the base model")
    if cfg.model.init_from_base:
        # a cached run may name no base: the cache records the checkpoint it was made with
        checkpoint = cfg.base.checkpoint or ((data.meta or {}).get("base") or {}).get("checkpoint")
        if not checkpoint:
            raise UserError("model.init_from_base=true needs base.checkpoint (the base model's weights)")
        init_from_base(model, checkpoint)
    if cfg.model.init_checkpoint:
        init_from_checkpoint(model, cfg.model.init_checkpoint)
    settings = cfg.train
    usable = int(data.valid.sum()) if data.valid is not None else sum(len(r) for r in data.shards)
    schedule = make_schedule(cfg, usable, accelerator.num_processes, settings.max_steps)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=schedule.lr, betas=(o.beta1, o.beta2))
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if data.base is not None:
        data.base.to(accelerator.device)
    return Run(cfg, settings, accelerator, data, prepared, model, optimizer, schedule, kwargs, run_dir / CHECKPOINT)


def restore(run: Run) -> None:
    """Continue from the run's checkpoint: weights, AdamW moments, loss scaler, RNG, step."""
    state = load_checkpoint(run.ckpt_path)
    run.accelerator.unwrap_model(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.accelerator.scaler is not None and state["scaler"] is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    run.step = run.last_saved = int(state["step"])


def epoch_batches(run: Run, micro: int):
    """The loader of the epoch that micro-batch `micro` falls in, started at that batch."""
    cfg, acc, schedule = run.cfg, run.accelerator, run.schedule
    epoch, start = divmod(micro, schedule.batches_per_epoch)
    order = epoch_order(run.data.shards, run.data.valid, cfg.seed, epoch, cfg.data.buffer_shards)
    views = view_indices(order, cfg.seed, epoch, run.data.views, cfg.data.view_mode)
    plan = plan_epoch(order, views, cfg.data.batch_size, acc.num_processes, acc.process_index,
                      schedule.batches_per_epoch, first_micro=epoch * schedule.batches_per_epoch)
    masks = partial(mask_noise, cfg.seed, batch=cfg.data.batch_size, num_patches=run.data.spec.num_patches)
    return epoch_loader(plan, run.data.make_batch, start, cfg.data.num_workers, torch.cuda.is_available(), masks)


def logged_losses(accelerator: Accelerator, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss term as a float, averaged over processes: the log shows the global batch's loss,
    and every process sees the same values (so all stop together on a non-finite one)."""
    stacked = torch.stack([v.detach().float() for v in losses.values()])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(losses, stacked.tolist()))


def micro_step(run: Run, batch: dict) -> dict[str, float]:
    """Forward, finite check, backward; the prepared optimizer steps once per accumulation cycle."""
    forward = _Forward(run.model, run.inner)
    with run.accelerator.accumulate(run.model):
        losses = step_losses(run.data, forward, batch, run.cfg, run.accelerator,
                             run.inner.encoder.patch_embed.patch_size[0])
        values = logged_losses(run.accelerator, losses)
        _check_finite(values, run.step, run.ckpt_path, run.last_saved)
        run.accelerator.backward(losses["loss"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return values


def train_until(run: Run, end: int, log: RunLog, bar) -> dict:
    """Optimizer steps until `end`: lr per iteration, logs, periodic atomic checkpoints."""
    accum, meter, last = run.cfg.optim.accum_steps, Meter(), {}
    micro = run.step * accum
    while run.step < end:
        fetch = time.perf_counter()
        for batch in epoch_batches(run, micro):
            meter.waited += time.perf_counter() - fetch
            if micro % accum == 0:
                set_lr(run.optimizer, run.schedule.lr_at(run.step, run.cfg.optim.min_lr))
            values = micro_step(run, batch)
            micro += 1
            meter.add(values, batch["images"].shape[0] * run.accelerator.num_processes, accum)
            if micro % accum == 0:
                run.step += 1
                if run.step % run.settings.log_every == 0 or run.step == end:
                    last = meter.record(run.step, micro / run.schedule.batches_per_epoch,
                                        run.optimizer.param_groups[0]["lr"])
                    log.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    img_s=f"{last['images_per_s']:.1f}")
                meter.sums = {}
                bar.update(1)
                if run.step % run.settings.checkpoint_every == 0 or run.step == end:
                    save_state(run.ckpt_path, run.accelerator, run.model, run.optimizer, run.step, run.kwargs,
                               run.cfg, run.schedule)
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
    run_dir = _run_dir(cfg, resume)
    accelerator = _accelerator(cfg, run_dir)
    try:
        run = setup_run(cfg, accelerator, run_dir, reader)
        identity = run_identity(cfg, run.data)
        if resume:
            check_resumable(run_dir, identity)
            restore(run)
        if accelerator.is_main_process:
            write_json(run_dir / IDENTITY_FILE, identity)
            write_json(run_dir / "config.json", to_dict(cfg))
            write_json(run_dir / "params.json", count_parameters(run.inner))
        accelerator.init_trackers("tec", config=_scalars(cfg))
        log = RunLog(run_dir, accelerator, run.step)
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
            "output": str(run_dir), "checkpoint": str(run.ckpt_path), "finished": run.step >= total}


# ---------------------------------------------------------------- ablations (Tab. 6)
def _title(path: Path) -> str:
    """A YAML's first comment line names its Tab. 6 row."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return path.stem


def ablation_overrides(path: Path) -> list[str]:
    """An ablation YAML as dotted overrides, so it layers over a full config (``--config``)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: an ablation file must hold a mapping")
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in flatten(data).items()]


def run_ablations(config_paths: Sequence[str | Path], cache: str | TargetReader, overrides: Sequence[str] = (),
                  base_config: Optional[str | Path] = None, output: str = "runs/ablations") -> list[dict]:
    """Train one run per Tab. 6 YAML from the same cache and print their final losses as a table.

    Layers, last wins: `base_config` (or the defaults), the ablation YAML, ``cache.path=<cache>``
    and ``targets.source=cache``, then `overrides`. Each run goes to ``<output>/<yaml stem>``
    and resumes there if it was interrupted (a finished one is only read back). A setting
    the cache cannot serve (e.g. k > k_max) makes that row "refused"; the others still run.
    `cache` is a cache path/URL or an already opened reader.
    """
    missing = [str(p) for p in config_paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"ablation config not found: {missing[0]}")
    reader = None if isinstance(cache, (str, Path)) else cache
    cache_override = [f"cache.path={cache}"] if reader is None else []
    rows = []
    for path in map(Path, config_paths):
        row = {"name": path.stem, "title": _title(path), "status": "done"}
        try:
            cfg = load_config(base_config, [*ablation_overrides(path), *cache_override, "targets.source=cache",
                                            *overrides])
            cfg = replace(cfg, output=str(Path(output) / path.stem))
            done = Path(cfg.output, CHECKPOINT).exists()
            summary = run_train(cfg, resume=done, reader=reader)
            row.update(step=summary["step"], **summary["losses"])
        except UserError as err:
            row.update(status=f"refused: {err}")
        rows.append(row)
    print(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table: row, steps, loss, L_fea, L_att (or why it was refused)."""
    head = f"{'ablation':<28} {'Tab. 6 row':<40} {'steps':>6} {'loss':>9} {'L_fea':>9} {'L_att':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: f"{v:9.4f}" if isinstance(v, float) else f"{'-':>9}"  # noqa: E731
    for r in rows:
        if r["status"] != "done":
            lines.append(f"{r['name']:<28} {r['title'][:40]:<40} {r['status']}")
        else:
            lines.append(f"{r['name']:<28} {r['title'][:40]:<40} {r['step']:>6} {fmt(r.get('loss'))} "
                         f"{fmt(r.get('loss_fea'))} {fmt(r.get('loss_att'))}")
    return "\n".join(lines)
