"""A training run's records: per-step losses, lr, throughput and data wait to ``RUN/log.jsonl`` and
accelerate's trackers (TensorBoard when installed); and the line a cached run starts with, how
many times it shows each cached view (its reuse). A cache of V views per image trained for E
epochs shows each view

    reuse = views seen / views cached = (S * B) / (N * V)

times (S optimizer steps of effective batch B, N usable images): E / V for whole epochs. The
authors' online TEC and MAE draw a new crop every time (reuse 1). Above `HARMLESS_REUSE`, the
largest reuse the reuse study found no cost at, the run warns once: nothing measured says it
is harmless there, and a cache can grow (`cache-targets` with a larger ``data.views``).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import UserError
from ..files import append_line, atomic_path

LOG_FILE = "log.jsonl"


class RunLog:
    """Per-step records to ``RUN/log.jsonl`` (truncated to the resumed step) and accelerate trackers."""

    def __init__(self, run_dir: Path, accelerator, resume_step: int):
        self.path, self.accelerator = Path(run_dir) / LOG_FILE, accelerator
        if accelerator.is_main_process:
            kept = []
            if resume_step and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            with atomic_path(self.path, "the run log") as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def last_losses(self) -> dict:
        """The last record with losses: an evaluation's record (a score) may follow it."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return next((r for r in map(json.loads, reversed(lines)) if "loss" in r), {})

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps(record), "the run log")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def tracker() -> Optional[str]:
    """accelerate's TensorBoard tracker when either TensorBoard package is installed."""
    from importlib.util import find_spec

    return "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else None


def scalars(settings: dict) -> dict:
    """The config's dotted `settings` that are scalars (what TensorBoard's hparams accept)."""
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}


class Meter:
    """The loss terms of the current optimizer step and the first non-finite one, kept on the compute
    device so the loop never waits for the device between records; throughput and data wait since
    the last record."""

    def __init__(self, accelerator):
        self.accelerator, self.names = accelerator, ()
        self.sums: Optional[torch.Tensor] = None  # (terms,) float64: this step's mean over its micro-batches
        self.bad_step: Optional[torch.Tensor] = None  # () int64: first step with a non-finite term, -1 while none
        self.bad_values: Optional[torch.Tensor] = None  # (terms,) float32: the terms of that micro-batch
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0

    def add(self, losses: dict[str, torch.Tensor], step: int, images: int, accum: int) -> None:
        """One micro-batch of step `step` (1-based): its terms averaged over processes (the global
        batch's loss, the same on every process, so all stop together on a non-finite one)."""
        stacked = torch.stack([v.detach().float() for v in losses.values()])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        if self.sums is None:
            self.names = tuple(losses)
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=stacked.device)
            self.bad_step = torch.full((), -1, dtype=torch.int64, device=stacked.device)
            self.bad_values = torch.zeros_like(stacked)
        self.sums += stacked.double() / accum  # the mean over the accumulated micro-batches
        first = (~torch.isfinite(stacked)).any() & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_values = torch.where(first, stacked, self.bad_values)
        self.images += images

    @contextmanager
    def paused(self) -> Iterator[None]:
        """What runs inside (an evaluation) is not the training's time: the throughput's clock skips it."""
        started = time.perf_counter()
        yield
        self.start += time.perf_counter() - started

    def next_step(self) -> None:
        """The loss terms start again for the next optimizer step; throughput keeps counting."""
        if self.sums is not None:
            self.sums.zero_()

    def check_finite(self, ckpt: Path, last_saved: int) -> None:
        """Stop on a NaN or inf loss seen since the run started, with one line naming the step, the
        terms and the checkpoint that is kept. Reads the device: call it at records and saves only."""
        step = int(self.bad_step) if self.bad_step is not None else -1
        if step < 0:
            return
        kept = f"the last good checkpoint {ckpt} (step {last_saved}) is kept" if last_saved >= 0 else "no checkpoint was saved"
        bad = [(k, v) for k, v in zip(self.names, self.bad_values.tolist()) if not math.isfinite(v)]
        terms = ", ".join(f"{k}={v}" for k, v in bad)
        raise UserError(f"step {step}: non-finite loss ({terms}); training stopped, {kept}")

    def record(self, step: int, epoch: float, lr: float) -> dict:
        """The log record of `step`: its loss terms (read from the device here), lr, throughput."""
        elapsed = time.perf_counter() - self.start
        terms = dict(zip(self.names, self.sums.tolist())) if self.sums is not None else {}
        rec = {"step": step, "epoch": epoch, "lr": lr, **terms,
               "images_per_s": self.images / elapsed, "data_wait": self.waited / elapsed}
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0
        return rec


# The largest reuse at which the demo's reuse study resolved no cost against fresh crops: 60 (a
# cache of 2 views for 120 epochs; its rule: a margin negative in every seed, two intervals below
# 0). At 120 (1 view) the linear probe lost 1.1 / 4.5 / 3.0 points in its 3 seeds, two intervals
# below 0; at 60 one seed of three lost 3.0 (`python -m experiments reuse`, 2026-12-06; docs/demo.md,
# "Reuse at ImageNet's rate"; benchmarks/results/reuse.json). Between 60 and 120 is unmeasured.
HARMLESS_REUSE = 60.0


def view_reuse(total_steps: int, effective_batch: int, usable_images: int, views: int) -> float:
    """Each cached view's expected number of uses: views seen / views cached."""
    return total_steps * effective_batch / (usable_images * views)


def reuse_lines(total_steps: int, effective_batch: int, usable_images: int, views: int) -> list[str]:
    """The start line of a cached run (and a warning line above `HARMLESS_REUSE`)."""
    reuse = view_reuse(total_steps, effective_batch, usable_images, views)
    lines = [f"train: each cached view is seen {reuse:.1f} times ({total_steps} steps x {effective_batch} / "
             f"({usable_images} images x {views} views))"]
    if reuse > HARMLESS_REUSE:
        more = math.ceil(reuse * views / HARMLESS_REUSE)
        lines.append(f"train: warning: a reuse of {reuse:.1f} is above {HARMLESS_REUSE:g}, the largest the demo's reuse "
                     f"study found harmless (docs/demo.md); data.views={more} or more keeps it below "
                     f"(cache-targets with it grows this cache)")
    return lines


def start_lines(source: str, total_steps: int, effective_batch: int, usable_images: int, views: int) -> list[str]:
    """`reuse_lines` for a cached run; none for online and pixel targets (they draw their crops: no cached view)."""
    return reuse_lines(total_steps, effective_batch, usable_images, views) if source == "cache" else []
