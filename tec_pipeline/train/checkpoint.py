"""A training run's files and state: checkpoints written atomically and read safely, exact
resume, the run's folder and its identity (what a resume may not change). The one module that
reads and writes checkpoint files (`export` writes the encoder from what it reads here)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..cache.schema import first_difference, short_value
from ..config import ViTArch, flatten
from ..errors import UserError
from ..files import atomic_path
from ..models.base import file_sha256
from ..models.checkpoints import unreadable
from ..models.tec import TECModel
from ..places import CHECKPOINT, IDENTITY_FILE, check_apart, check_run_place

RUN_WRITES = (CHECKPOINT, IDENTITY_FILE, "config.json", "params.json", "result.json")  # atomically, by name
UNFINISHED = re.compile(r"\.tmp-[0-9a-f]{8}")  # `files.temporary_name`'s suffix
# The settings naming folders a run reads images from (stage two's, fine-tuning's): no run lies in one.
IMAGE_FOLDERS = ("data.path", "data.train", "data.val", "train.monitor.train", "train.monitor.val")

# What a resume may change: where the run logs and writes, how fast it loads, where its data
# lies (the data's identity is compared by content instead), stage one's own settings, and how it
# is watched (the monitor never changes the weights; its history restarts where its images or
# protocol change, `train.monitor.Monitor.load_state`).
RESUMABLE_CHANGES = ("output", "train.log_every", "train.checkpoint_every", "data.num_workers", "data.prefetch_batches",
                     "data.path", "cache.path", "cache.storage_options", "cache.writer_threads", "base.compute_dtype",
                     "train.monitor")


# ---------------------------------------------------------------- checkpoint files
class _KeepsWriteError:
    """A binary file that keeps the `OSError` of a failed write: `torch.save` reports one only
    as a bare ``RuntimeError`` ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: Path, what: str = "the training checkpoint") -> None:
    """`torch.save` to a temporary name, fsync, rename: a half-written file never looks complete,
    and a failed write (full disk) is a `StorageError` that leaves the previous file as it was."""
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        out = _KeepsWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def load_checkpoint(path: Path) -> dict:
    """A run checkpoint, read with ``weights_only=True`` (no pickled code is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint (has this run saved one yet?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's message is many lines, with advice that would run pickled code
        raise UserError(f"{path}: not a tec-pipeline checkpoint; {unreadable(err)}") from None


def build_model(kwargs: dict) -> TECModel:
    """The `TECModel` a checkpoint's ``model_kwargs`` describe (arch stored as a dict)."""
    return TECModel(**{**kwargs, "arch": ViTArch(**kwargs["arch"])})


def load_run_model(checkpoint: str | Path) -> tuple[TECModel, ViTArch]:
    """The `TECModel` of a training run's checkpoint (its file or its folder), weights loaded strictly."""
    path = Path(checkpoint)
    path = path / CHECKPOINT if path.is_dir() else path
    ckpt = load_checkpoint(path)
    if "model_kwargs" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a tec-pipeline training checkpoint")
    model = build_model(ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"], strict=True)
    return model, ViTArch(**ckpt["model_kwargs"]["arch"])


# ---------------------------------------------------------------- state and resume
def run_dir(output: str, settings: dict, resume: bool) -> Path:
    """The run's folder ``output``, checked but not made: refused if it already holds a run and
    `resume` is off, or holds none to resume, or if it is (or lies inside) a target cache or one of
    the image folders among the run's dotted `settings`. The run's first
    write makes it (`files.atomic_path`), after every setting has been checked, so a refused run
    leaves no empty folder. What a save killed half-way left (`checkpoint.pt.tmp-*`) is removed."""
    path = Path(output)
    check_run_place(path)
    check_apart("output", path, {k: v for k, v in settings.items() if k in IMAGE_FOLDERS})
    if path.exists() and not path.is_dir():
        raise UserError(f"output={path} is a file, not a folder: choose another output")
    ckpt = path / CHECKPOINT
    if ckpt.exists() and not resume:
        raise UserError(f"output={path} already holds a run; pass --resume to continue it or choose another output")
    if resume and not ckpt.exists():
        raise UserError(f"--resume: output={path} has no checkpoint to continue from")
    check_no_others(path)
    remove_unfinished_saves(path)
    return path


def check_no_others(path: Path) -> None:
    """Refuse an existing folder that holds files but no run: a run writes its identity first (and
    a checkpoint to resume is read, and refused if it is not this run's, before anything is
    written), so without either nothing there is proven a run's, and a run would overwrite a
    user's config.json or log.jsonl of the same name."""
    if not path.is_dir() or (path / IDENTITY_FILE).is_file() or (path / CHECKPOINT).is_file():
        return
    others = sorted(p.name for p in path.iterdir() if not unfinished_save(p.name))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(f"output={path} holds {others[0]}{more} and no run ({IDENTITY_FILE}): a run writes "
                        f"config.json, log.jsonl and more there; choose a new or empty folder")


def unfinished_save(name: str) -> bool:
    """A temporary file of a save of one of the run's own files (`files.temporary_name`: ``name.tmp-``
    and 8 hex digits), left where the save was killed before its rename."""
    return any(name.startswith(own) and UNFINISHED.fullmatch(name[len(own):]) for own in RUN_WRITES)


def remove_unfinished_saves(path: Path) -> None:
    """Remove what killed saves of the run's own files left (`unfinished_save`)."""
    if path.is_dir():
        for leftover in path.iterdir():
            if unfinished_save(leftover.name):
                leftover.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(accelerator, model, optimizer, step: int) -> dict:
    """What every resumable run saves: weights, optimizer moments, loss scaler, RNG, step (= data position)."""
    return {
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "step": step,  # optimizer steps done; the data position is step x accum micro-batches
        "rng": rng_state(),
    }


def save_state(path: Path, accelerator, model, optimizer, step: int, stored: dict,
               what: str = "the training checkpoint") -> None:
    """Full training state, atomically: `training_state` and `stored` (what else the run keeps or
    continues from: the model's arguments, schedule and config; the monitor's history; the scores)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_save({**training_state(accelerator, model, optimizer, step), **stored}, path, what)


def restore_state(state: dict, accelerator, model, optimizer, path: Path | str = CHECKPOINT) -> int:
    """Load a read checkpoint's weights, AdamW moments, loss scaler and RNG into the run; returns its
    step. `path`, the file it was read from, is named where it does not fit this run's model."""
    own = accelerator.unwrap_model(model)
    saved = state.get("model")
    why = other_weights(own.state_dict(), saved) if isinstance(saved, dict) else "no model weights in it"
    if why is None:
        try:
            own.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as err:  # no optimizer state, or one of other parameter groups
            why = f"its optimizer state does not fit ({' '.join(str(err).split())})"
    if why is not None:
        raise UserError(f"{path}: not a checkpoint of this run's model ({why}); resume with the settings that "
                        f"wrote it, or choose another output")
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def other_weights(own: dict, saved: dict) -> Optional[str]:
    """The first weight where a saved state dict differs from the model's, in words; None if none does."""
    for key, value in own.items():
        if key not in saved:
            return f"no '{key}' in it"
        if not isinstance(saved[key], torch.Tensor):
            return f"'{key}' in it is not a tensor"
        if tuple(saved[key].shape) != tuple(value.shape):
            return f"'{key}' is {tuple(saved[key].shape)} in it, {tuple(value.shape)} in this model"
    extra = next((key for key in saved if key not in own), None)
    return None if extra is None else f"'{extra}' in it has no place in this model"


# ---------------------------------------------------------------- identity
def run_identity(settings: dict, data_identity: object, cached: bool, renderer: str = "pil") -> dict:
    """What a run's weights depend on: its dotted `settings` less `RESUMABLE_CHANGES`, the data it reads
    (a cache's identity or an image folder's fingerprint, so rebuilt data at the same path
    counts), who renders its views (``data.loader`` resolved: ``auto`` may differ between
    machines) and the checkpoints it starts from, by content. A cached run's base is already in
    the cache's identity (and `data.check_cache_base` holds base.checkpoint to it), so it is
    not hashed again."""
    config = config_identity(settings, RESUMABLE_CHANGES)
    base = None if cached else settings["base.checkpoint"]
    starts = {name: file_sha256(path) for name, path in
              (("base.checkpoint", base), ("model.init_checkpoint", settings["model.init_checkpoint"]))
              if path and Path(path).is_file()}
    # through JSON, as it is stored: tuples become lists, so a resume compares like with like
    return json.loads(json.dumps({"config": config, "data": data_identity, "renderer": renderer,
                                  "checkpoint_sha256": starts}))


def config_identity(settings: dict, resumable: tuple[str, ...]) -> dict:
    """A config's dotted `settings`, less those a resume may change (`resumable` keys and what is under them)."""
    return {k: v for k, v in settings.items()
            if not any(k == c or k.startswith(c + ".") for c in resumable)}


def check_resumable(path: Path, identity: dict) -> None:
    """Refuse, naming the first differing setting, to continue a run whose config, data or
    starting weights have changed: its schedule and weights would silently mix two runs.

    Only what both identities record is compared: one written by another version of this
    code may record more or less, and that alone says nothing about the run.
    """
    stored = path / IDENTITY_FILE
    if not stored.is_file():  # a run without a recorded identity: nothing to compare
        return
    try:
        recorded = json.loads(stored.read_text())
    except (ValueError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{stored} is damaged (not the JSON mapping a run records); resume a run this tec-pipeline "
                        "wrote, or choose another output")
    check_same_views(path, recorded, identity)
    diff = first_difference(recorded, identity, shared_only=True)
    if diff is not None:
        key, was, now = diff
        key = key.removeprefix("config.")
        raise UserError(f"output={path} was trained with {key}={short_value(was, now)}, this run has "
                        f"{short_value(now, was)}; resume with the same settings and data, or choose another output")


def check_same_views(path: Path, recorded: dict, identity: dict) -> None:
    """A cached run whose cache now holds another number of views (it grew, `cache.growth`) is
    refused in one line saying so: epoch e trains on view e mod V, so the views, the epochs'
    order and the weights of the run so far would belong to another schedule than the rest."""
    was, now = (flatten(i.get("data") if isinstance(i.get("data"), dict) else {}).get("data.views")
                for i in (recorded, identity))
    if was is not None and now is not None and was != now:
        change = f"views {was}-{now - 1} were added since: it grew or was remade" if now > was else "it was remade"
        raise UserError(f"output={path} was trained on a cache of {was} views; cache.path now holds {now} ({change}); "
                        f"a run cannot change its views midway: train a new output from this cache")
