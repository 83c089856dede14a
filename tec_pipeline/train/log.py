"""A training run's records: per-step losses, lr, throughput and data wait to ``RUN/log.jsonl`` and
accelerate's trackers (TensorBoard when installed)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import Config, flatten, to_dict
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

    def last(self) -> dict:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return json.loads(lines[-1]) if lines else {}

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps(record), "the run log")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def tracker() -> Optional[str]:
    """accelerate's TensorBoard tracker when either TensorBoard package is installed."""
    from importlib.util import find_spec

    return "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else None


def scalars(cfg: Config) -> dict:
    """The config flattened to scalars (what TensorBoard's hparams accept)."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}


class Meter:
    """Loss terms of the current optimizer step, and throughput / data wait since the last record."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0

    def add(self, values: dict[str, float], images: int, accum: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / accum  # mean over the accumulated micro-batches
        self.images += images

    def next_step(self) -> None:
        """The loss terms start again for the next optimizer step; throughput keeps counting."""
        self.sums = {}

    def record(self, step: int, epoch: float, lr: float) -> dict:
        elapsed = time.perf_counter() - self.start
        rec = {"step": step, "epoch": epoch, "lr": lr, **self.sums,
               "images_per_s": self.images / elapsed, "data_wait": self.waited / elapsed}
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0
        return rec


def logged_losses(accelerator, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss term as a float, averaged over processes: the log shows the global batch's loss,
    and every process sees the same values (so all stop together on a non-finite one)."""
    stacked = torch.stack([v.detach().float() for v in losses.values()])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(losses, stacked.tolist()))


def check_finite_losses(values: dict[str, float], step: int, ckpt: Path, last_saved: int) -> None:
    """Stop on a NaN or inf loss with one line naming the terms and the checkpoint that is kept."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        kept = f"the last good checkpoint {ckpt} (step {last_saved}) is kept" if last_saved >= 0 else "no checkpoint was saved"
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UserError(f"step {step + 1}: non-finite loss ({terms}); training stopped, {kept}")
