"""Watch a run: the new model scored against its base while it trains (``train.monitor``).

At every evaluation the encoder is taken as `export` would write it (`models.tec.encoder_state`:
the input adapter folded into the cls token) into a frozen copy, and its features of a labelled
train / val pair (`open_sets`) are scored by `eval`'s own protocols: the weighted k-NN, and
the linear probe with ``protocol: linear`` or at the last step with ``probe_at_end``. The base is
scored once, by the same code, so every record holds the new model's score, the base's and their
difference. A score that falls more than ``drop_margin`` below the best seen, or stays below the
base's past ``below_base_after`` of the run, is a warning; with ``stop_on_drop`` the run stops
there with a checkpoint.

An evaluation never changes the training: it runs without gradients on a copy, restores no mode
because it touches none, and draws nothing from the global generators (a base built from random
weights draws under `torch.random.fork_rng`). The history, the base's scores and the probe's C
are kept in the run's checkpoint, so a resumed run continues the same series of points.

The labelled images: each split (``train.monitor.train`` / ``val``) is opened and checked when
the run is set up, before any training step, and each process decodes its own contiguous block
of it once, at the encoder's input size, to uint8 tensors it keeps. An evaluation then costs the
encoder's forward alone. Features are computed as `eval` computes them (`evaluate.features`: the
same resize, normalization and pooling), on the compute device under the run's autocast, and
gathered from every process in image order, so the score does not depend on how many processes
share the work.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Config, MonitorConfig
from ..data.sources import ImageSource
from ..errors import UserError
from ..evaluate.features import encoder_img_size, image_batches, labelled_split, pool_features
from ..evaluate.protocols import choose_probe_C, knn_predict
from ..evaluate.report import score_features
from ..models.tec import encoder_state
from ..views import normalize
from .log import RunLog
from .model import base_checkpoint, run_base


@dataclass
class LabelledSet:
    """One split as this process holds it: its block of decoded images and every image's label."""

    path: str
    images: Tensor  # (this process's images, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64: every image's label, in the split's order
    blocks: list[int]  # images per process, in process order (they sum to N)
    fingerprint: str  # the source's content identity (names and sizes)


class Picked:
    """The images of `source` at `indices`, as an `ImageSource` (what `image_batches` reads)."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.source.load(int(self.indices[index]))


def spread(n: int, max_images: int) -> np.ndarray:
    """At most `max_images` of `n` images (0: all), evenly spaced in the split's order, so a
    class-sorted folder keeps every class in proportion without drawing from any generator."""
    if not max_images or n <= max_images:
        return np.arange(n)
    return np.linspace(0, n - 1, max_images).round().astype(np.int64)


def block_sizes(n: int, processes: int) -> list[int]:
    """Images per process when `n` images are cut into `processes` contiguous blocks in order."""
    return [n * (p + 1) // processes - n * p // processes for p in range(processes)]


def labelled(kind: str, key: str, path: str, classes: Optional[list[str]]) -> tuple[ImageSource, np.ndarray, list]:
    """(source, labels, class names) of ``train.monitor.<key>`` = `path` (`evaluate.features.labelled_split`;
    `classes`: the train split's, so val agrees); every problem is one line naming the key."""
    name = f"train.monitor.{key}={path}"
    try:
        return labelled_split(kind, path, classes, name, "the monitor")
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(name) else f"{name}: {message}") from None


def open_sets(cfg: MonitorConfig, size: int, processes: int, index: int) -> tuple[LabelledSet, LabelledSet, list]:
    """(train, val, class names): both splits checked, subsampled (``max_images``) and this
    process's block of each decoded at `size` x `size`."""
    if not cfg.train or not cfg.val:
        missing = "train.monitor.val" if cfg.train else "train.monitor.train"
        raise UserError(f"{missing} is empty: the monitor needs a labelled train and val split (or neither)")
    sets, classes = [], None
    for key, path in (("train", cfg.train), ("val", cfg.val)):
        source, labels, classes = labelled(cfg.kind, key, path, classes)
        picked = spread(len(source), cfg.max_images)
        if key == "train" and len(np.unique(labels[picked])) < 2:
            raise UserError(f"train.monitor.train={cfg.train}: its images are of one class; a score needs two")
        blocks = block_sizes(len(picked), processes)
        start = sum(blocks[:index])
        mine = Picked(source, picked[start:start + blocks[index]])
        try:
            batches = list(image_batches(mine, size, cfg.batch_size))
        except UserError as err:  # an image that does not decode
            raise UserError(f"train.monitor.{key}={path}: {err}") from None
        images = torch.cat(batches) if batches else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        sets.append(LabelledSet(path, images, labels[picked], blocks, source.fingerprint()))
    return sets[0], sets[1], classes


def gathered_features(encoder, data: LabelledSet, pool: str, batch_size: int, accelerator) -> np.ndarray:
    """(N, C) float32 frozen features of the whole split, in its order: this process's block
    through `pool_features` on the compute device (under the run's autocast), then every
    process's block gathered. Reads the device: call it only at an evaluation."""
    device, width = accelerator.device, encoder.num_features
    with accelerator.autocast():
        parts = [pool_features(encoder, normalize(batch.to(device)), pool).float()
                 for batch in data.images.split(batch_size)]
    local = torch.cat(parts) if parts else torch.zeros(0, width, device=device)
    if accelerator.num_processes > 1:  # equal shapes for the collective: pad each block to the largest
        most = max(data.blocks)
        padded = torch.zeros(most, width, device=device, dtype=local.dtype)
        padded[:len(local)] = local
        every = accelerator.gather(padded).reshape(accelerator.num_processes, most, width)
        local = torch.cat([every[p, :n] for p, n in enumerate(data.blocks)])
    return local.cpu().numpy()


PICTURE = "monitor.png"
NAMES = {"knn": "k-NN", "linear": "linear"}


class MonitorStop(UserError):
    """``train.monitor.stop_on_drop``: the score fell; the run stopped after writing its checkpoint."""


def base_loader(cfg: Config, data) -> Optional[Callable]:
    """How to get the run's base for its one evaluation: the online run's loaded base, else the
    checkpoint ``base.checkpoint`` names or the cache recorded; None where the run has no base
    (pixel targets without ``base.checkpoint``)."""
    checkpoint = base_checkpoint(cfg, data)
    if data.base is None and not checkpoint:
        return None
    return lambda: run_base(cfg, data, checkpoint)


class Monitor:
    """The run's online score: its labelled sets, a frozen encoder copy, the history and the guard."""

    def __init__(self, cfg: MonitorConfig, accelerator, encoder: torch.nn.Module, base: Optional[Callable],
                 total_steps: int, steps_per_epoch: int, picture: Optional[str] = None):
        self.cfg, self.accelerator, self.base = cfg, accelerator, base
        self.total_steps, self.steps_per_epoch, self.picture = total_steps, steps_per_epoch, picture
        self.train, self.val, self.classes = open_sets(cfg, encoder_img_size(encoder), accelerator.num_processes,
                                                       accelerator.process_index)
        self.encoder = copy.deepcopy(encoder).requires_grad_(False).eval()  # loads the export at each evaluation
        self.history: list[dict] = []  # one {step, epoch, knn[, linear], seconds} per evaluation
        self.base_scores: Optional[dict] = None  # {knn[, linear], seconds}: the base's, computed once
        self.probe_C: Optional[float] = None  # the probe's C, chosen once (on the base's features)

    # ------------------------------------------------------------ schedule and state
    def interval(self) -> int:
        return self.cfg.every or self.cfg.every_epochs * self.steps_per_epoch

    def due(self, step: int) -> bool:
        return step % self.interval() == 0 or step == self.total_steps

    def identity(self) -> dict:
        """What makes two histories one series: the images (by content) and the protocol."""
        c = self.cfg
        return {"train": self.train.fingerprint, "val": self.val.fingerprint, "max_images": c.max_images,
                "pool": c.pool, "k": c.k, "temperature": c.temperature, "protocol": c.protocol}

    def state(self) -> dict:
        return {"identity": self.identity(), "history": self.history, "base": self.base_scores,
                "probe_C": self.probe_C}

    def load_state(self, state: Optional[dict], step: int) -> None:
        """Continue a checkpoint's history; one whose images or protocol differ starts a new one."""
        if state is None or state.get("identity") != self.identity():
            if state is not None:
                self.say(f"monitor: train.monitor's images or protocol changed; its history starts again at step {step}")
            return
        self.history, self.base_scores, self.probe_C = list(state["history"]), state["base"], state["probe_C"]

    # ------------------------------------------------------------ evaluations
    def wants_linear(self, step: int) -> bool:
        return self.cfg.protocol == "linear" or (self.cfg.probe_at_end and step == self.total_steps)

    def scores(self, encoder: torch.nn.Module, linear: bool) -> dict:
        """{knn[, linear]} of `encoder` on the val split, fitted on the train split, by `eval`'s
        code; computed on the main process and shared, so every process takes the same decision."""
        c, acc = self.cfg, self.accelerator
        with torch.random.fork_rng(devices=[acc.device.index or 0] if acc.device.type == "cuda" else []):
            train_X = gathered_features(encoder, self.train, c.pool, c.batch_size, acc)
            val_X = gathered_features(encoder, self.val, c.pool, c.batch_size, acc)
        found = [None]
        if acc.is_main_process:
            found[0] = self.score(train_X, val_X, linear)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)
        return found[0]

    def score(self, train_X: np.ndarray, val_X: np.ndarray, linear: bool) -> dict:
        (ytr, yte), n = (self.train.labels, self.val.labels), len(self.classes)
        if not linear:
            return {"knn": float(np.mean(knn_predict(train_X, ytr, val_X, self.cfg.k, self.cfg.temperature, n) == yte))}
        if self.probe_C is None:  # chosen once, so the curve moves with the features alone
            self.probe_C = choose_probe_C(train_X, ytr)
        row = score_features((train_X, ytr), None, (val_X, yte), self.cfg.k, self.cfg.temperature, n, self.probe_C)
        return {"knn": row["knn"], "linear": row["linear"]}

    def start(self, model, step: int, log: RunLog) -> None:
        """Before the first step of this process: the base's score (once per run), and the starting
        weights' point where the history has none."""
        if self.base_scores is None and self.base is not None:
            began = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # a base of random weights draws its init
                base = self.base().to(self.accelerator.device)
            self.base_scores = self.scores(base, self.cfg.protocol == "linear" or self.cfg.probe_at_end)
            self.base_scores["seconds"] = time.perf_counter() - began
            self.say(f"monitor: base {self.describe(self.base_scores, None)} "
                     f"({self.base_scores['seconds']:.1f} s, once per run)")
        if not self.history:
            self.evaluate(model, step, log)

    def evaluate(self, model, step: int, log: RunLog) -> Optional[str]:
        """Score the model as exported, record it, draw the picture; the guard's warning, if any."""
        began = time.perf_counter()
        self.encoder.load_state_dict(encoder_state(model))
        point = {"step": step, "epoch": step / self.steps_per_epoch,
                 **self.scores(self.encoder, self.wants_linear(step))}
        point["seconds"] = time.perf_counter() - began
        self.history.append(point)
        warning = self.guard(point)
        log.write(self.record(point, warning))
        self.say(f"monitor: step {step} (epoch {point['epoch']:.1f}): {self.describe(point, self.base_scores)} "
                 f"({point['seconds']:.1f} s)")
        if warning:
            self.say(f"warning: monitor: {warning}")
        if self.picture and self.accelerator.is_main_process:
            from ..viz import plot_monitor

            plot_monitor(log.path, self.picture)
        return warning

    # ------------------------------------------------------------ guard and records
    def guard(self, point: dict) -> Optional[str]:
        """Why the point is a warning: a drop below the best seen, or below the base late in the run."""
        c, metric = self.cfg, self.cfg.protocol
        score, name = point[metric], NAMES[metric]
        best = max(self.history, key=lambda p: p.get(metric, -1.0))
        if score < best[metric] - c.drop_margin:
            return (f"{name} top-1 {score:.1%} at step {point['step']} is {100 * (best[metric] - score):.1f} points "
                    f"below the best seen ({best[metric]:.1%} at step {best['step']}; "
                    f"train.monitor.drop_margin={c.drop_margin})")
        base = (self.base_scores or {}).get(metric)
        late = c.below_base_after is not None and point["step"] >= c.below_base_after * self.total_steps
        if base is not None and late and score < base:
            return (f"{name} top-1 {score:.1%} at step {point['step']} is below the base's {base:.1%} past "
                    f"{c.below_base_after:.0%} of the run (train.monitor.below_base_after)")
        return None

    def record(self, point: dict, warning: Optional[str]) -> dict:
        """The log record: each score, the base's and their difference, under ``monitor/``."""
        rec = {"step": point["step"], "epoch": point["epoch"]}
        for metric in ("knn", "linear"):
            if metric in point:
                rec[f"monitor/{metric}_top1"] = point[metric]
                base = (self.base_scores or {}).get(metric)
                if base is not None:
                    rec[f"monitor/base_{metric}_top1"] = base
                    rec[f"monitor/{metric}_vs_base"] = point[metric] - base
        rec["monitor/seconds"] = point["seconds"]
        if warning:
            rec["monitor/warning"] = warning
        return rec

    def describe(self, scores: dict, against: Optional[dict]) -> str:
        """The scores in percent, the guarded one first, each beside `against`'s (the base's) where known."""
        order = [self.cfg.protocol] + [m for m in ("knn", "linear") if m != self.cfg.protocol]
        parts = []
        for metric in (m for m in order if m in scores):
            base = (against or {}).get(metric)
            vs = f" (base {base:.1%}, {100 * (scores[metric] - base):+.1f})" if base is not None else ""
            parts.append(f"{NAMES[metric]} {scores[metric]:.1%}{vs}")
        return ", ".join(parts)

    def stop(self, warning: str, step: int, checkpoint) -> MonitorStop:
        return MonitorStop(f"train.monitor.stop_on_drop: {warning}; stopped at step {step}, checkpoint {checkpoint} "
                           "written; --resume continues (with train.monitor.stop_on_drop=false to train past it)")

    def say(self, line: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(line, file=sys.stderr)
