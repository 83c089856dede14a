"""View renderers: a view's stored crop ``(top, left, height, width, flip)`` and its source file ->
its pixels, (N, 3, S, S) uint8 on the compute device. ``data.loader`` names the renderer:

- ``pil``: PIL decodes the whole file on the host and `views.render_view` resizes the crop box
  (bicubic, antialiased); the loader workers do both.
- ``dali``: NVIDIA DALI renders on the compute device (``mixed``: nvJPEG and the hardware JPEG
  decoders on CUDA; ``cpu`` elsewhere, the same graph): it decodes only a window around the crop
  (`render_dali.decode_window`), resizes the crop inside it with a cubic antialiased filter, and flips. The
  loader workers only read the file's bytes.

A cache records the renderer that made its targets (``data.loader`` in its identity).
"""
from __future__ import annotations

import importlib
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.sources import BadImageError, decode_rgb
from .errors import UserError
from .views import ViewParams, render_view

LOADERS = ("pil", "dali")


def dali_missing() -> Optional[str]:
    """Why DALI cannot render here (one line), or None when it can."""
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as err:
        return f"NVIDIA DALI is not installed ({err}; pip install nvidia-dali-cuda130)"
    return None


def cache_loader(meta: dict) -> str:
    """The renderer a cache's views were made with (``data.loader`` in its identity; caches from
    before it was recorded were rendered by pil)."""
    return meta.get("identity", {}).get("data", {}).get("loader", "pil")


def resolve_loader(setting: str, device: torch.device) -> str:
    """``data.loader`` as used on `device`: ``auto`` is dali on CUDA where DALI is installed, else pil
    (on CUDA without DALI, one line says so); ``dali`` without DALI is refused in one line."""
    missing = dali_missing()
    if setting == "dali" and missing:
        raise UserError(f"data.loader=dali: {missing}; or set data.loader=pil")
    if setting != "auto":
        return setting
    if device.type == "cuda" and missing:
        print(f"data.loader=auto: {missing}; rendering views with pil in the loader workers")
    return "dali" if device.type == "cuda" and not missing else "pil"


def pack_files(files: Sequence[bytes]) -> dict[str, Tensor]:
    """Encoded files as one uint8 tensor and their end offsets: a loader worker hands the batch over
    as two shared-memory buffers rather than N pickled strings."""
    ends = torch.from_numpy(np.cumsum([len(f) for f in files], dtype=np.int64))
    joined = bytearray(b"".join(files))
    data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    return {"files": data, "file_ends": ends}


def unpack_files(batch: dict[str, Tensor]) -> list[np.ndarray]:
    """`pack_files`' files as uint8 views into the batch's buffer (no copies)."""
    data, ends = batch["files"].numpy(), batch["file_ends"].tolist()
    return [data[start:end] for start, end in zip([0] + ends[:-1], ends)]


class ViewRenderer(Protocol):
    """Encoded source files and crops -> views on the device, with a reason per undecodable file."""

    name: str
    size: int
    device: torch.device

    def render(self, encoded: Sequence[np.ndarray], crops: np.ndarray) -> tuple[Tensor, list[str]]:
        """`crops` (N, 5) int32 -> (views (N, 3, S, S) uint8, errors): errors[i] is "" or why
        file i could not be decoded (its view is then black)."""


class PilRenderer:
    """`views.render_view` on the host, one file at a time; views moved to `device`."""

    name = "pil"

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device

    def render(self, encoded: Sequence[np.ndarray], crops: np.ndarray) -> tuple[Tensor, list[str]]:
        views, errors = torch.zeros(len(crops), 3, self.size, self.size, dtype=torch.uint8), []
        for i, (data, crop) in enumerate(zip(encoded, crops)):
            try:
                views[i] = render_view(decode_rgb(bytes(data), f"file {i}"), ViewParams.from_array(crop), self.size)
                errors.append("")
            except BadImageError as err:
                errors.append(str(err).split(": ", 1)[-1])
        return views.to(self.device), errors


def render_files(renderer: ViewRenderer, batch: dict[str, Tensor], crops: np.ndarray, per_file: int,
                 valid: Optional[np.ndarray] = None) -> tuple[Tensor, list[str]]:
    """The views of a batch whose loader read only the files (`pack_files`): file f's views are
    crops rows f * per_file .. (f + 1) * per_file - 1. Files marked not `valid` are not decoded.
    Returns views (N * per_file, 3, S, S) uint8 on the renderer's device, black where a file was
    skipped or undecodable, and one error per file ("" when it rendered)."""
    files = unpack_files(batch)
    kept = [f for f in range(len(files)) if valid is None or valid[f]]
    rows = [f * per_file + v for f in kept for v in range(per_file)]
    errors = [""] * len(files)
    if len(kept) == len(files):  # the usual batch: the renderer's views are the batch's, in order
        views, failed = renderer.render([files[f] for f in kept for _ in range(per_file)], crops)
    else:
        views = torch.zeros(len(files) * per_file, 3, renderer.size, renderer.size, dtype=torch.uint8,
                            device=renderer.device)
        failed = []
        if kept:
            pixels, failed = renderer.render([files[f] for f in kept for _ in range(per_file)], crops[rows])
            views[to_device(torch.tensor(rows, dtype=torch.long), views.device)] = pixels
    for row, why in enumerate(failed):
        errors[kept[row // per_file]] = errors[kept[row // per_file]] or why
    return views, errors


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without the host waiting: pinned, then copied on the device's stream."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def open_renderer(name: str, size: int, device: torch.device, max_batch: int, threads: int = 1) -> ViewRenderer:
    """The renderer called `name` (a resolved ``data.loader``) for views of `size` px on `device`."""
    if name == "pil":
        return PilRenderer(size, device)
    from .render_dali import DaliRenderer  # DALI is imported only where it renders

    return DaliRenderer(size, device, max_batch, threads)
