"""The ``dali`` view renderer: one DALI graph (region-of-interest decode, cubic antialiased resize
of the crop, horizontal flip) fed per batch with the files' bytes and each view's window.

The graph runs where the views are needed: ``mixed`` decoding on CUDA (the result lands in device
memory), ``cpu`` elsewhere. On CUDA it runs on DALI's dynamic executor bound to torch's current
stream: DALI's outputs are ordered on that stream and copied into torch's tensor on it, so the
host never waits for the device's work (the default executor would return only after the host had
synchronized with it). DALI fails a whole batch when one file cannot be decoded, so a failed batch
is rendered again file by file to name the bad ones.
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from nvidia.dali import fn, math as dmath, pipeline_def, types
from torch import Tensor

from .views import ViewParams


CUBIC_SUPPORT = 2  # pixels on each side that a cubic kernel reads at scale 1


def decode_window(crop: ViewParams, size: int) -> tuple[list[int], list[int], list[float], list[float]]:
    """The part of the image DALI decodes for a crop: the crop plus the margin its resampling filter
    reads (the cubic support, widened by the downscale factor), so edge pixels see the same
    neighbours as in a whole-image resize. Returns (anchor, shape) of the window and the crop as a
    region (start, end) inside it, all (y, x). The window may pass the image's far edge: the
    decoder trims it there."""
    scale = max(1.0, crop.height / size, crop.width / size)
    margin = math.ceil(CUBIC_SUPPORT * scale) + 1
    top, left = max(0, crop.top - margin), max(0, crop.left - margin)
    anchor = [top, left]
    shape = [crop.top + crop.height + margin - top, crop.left + crop.width + margin - left]
    start = [float(crop.top - top), float(crop.left - left)]
    return anchor, shape, start, [start[0] + crop.height, start[1] + crop.width]


@pipeline_def(exec_dynamic=True, prefetch_queue_depth=1)  # one batch in flight: fed, run, read
def view_graph(size: int, decoder_device: str):
    """encoded bytes, window (anchor, shape), crop region in the window, flip -> (S, S, 3) uint8."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    anchor = fn.external_source(name="anchor", dtype=types.INT32)
    shape = fn.external_source(name="shape", dtype=types.INT32)
    start = fn.external_source(name="start", dtype=types.FLOAT)
    end = fn.external_source(name="end", dtype=types.FLOAT)
    flip = fn.external_source(name="flip", dtype=types.INT32)
    image_hw = fn.cast(fn.peek_image_shape(encoded, adjust_orientation=False)[0:2], dtype=types.INT32)
    shape = dmath.min(anchor + shape, image_hw) - anchor  # the window trimmed at the image's far edges
    window = fn.decoders.image_slice(encoded, anchor, shape, device=decoder_device, output_type=types.RGB,
                                     axis_names="HW", adjust_orientation=False)
    view = fn.resize(window, size=[size, size], roi_start=start, roi_end=end, roi_relative=False,
                     interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.flip(view, horizontal=flip, vertical=0)


@contextmanager
def captured_stderr():
    """The process's stderr (file descriptor 2) while the block runs, as a list filled on exit: the
    decoders print why a file failed there, and only there."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def decode_failure(printed: list[str]) -> str:
    """Why the decoder failed, from what it printed ("... - Premature end of JPEG data. ...")."""
    plain = (re.sub(r"\x1b\[[0-9;]*m", "", line) for line in printed)  # colour codes
    said = [re.sub(r"^(\s*\[[^]]*\])+", "", line).strip() for line in plain if line.strip()]  # [ERROR] [decoder]
    return " ".join(said[-1].split())[:200] if said else "the decoder failed on it"


class DaliRenderer:
    """`render.ViewRenderer` on DALI; batches of up to `max_batch` views."""

    name = "dali"

    def __init__(self, size: int, device: torch.device, max_batch: int, threads: int = 1):
        self.size, self.device, self.max_batch = size, device, max_batch
        self.threads = max(1, threads)
        self.graph = self._build()

    def _build(self):
        """A new graph: a DALI graph that failed a batch fails every later run too."""
        cuda = self.device.type == "cuda"
        graph = view_graph(self.size, "mixed" if cuda else "cpu", batch_size=self.max_batch, num_threads=self.threads,
                           device_id=(self.device.index or 0) if cuda else None)
        graph.build()
        return graph

    def render(self, encoded: Sequence[np.ndarray], crops: np.ndarray) -> tuple[Tensor, list[str]]:
        views = torch.zeros(len(crops), self.size, self.size, 3, dtype=torch.uint8, device=self.device)
        errors = [""] * len(crops)
        for lo in range(0, len(crops), self.max_batch):
            part = slice(lo, lo + self.max_batch)
            try:
                with captured_stderr() as printed:
                    views[part] = self._run(encoded[part], crops[part])
                sys.stderr.write("".join(line + "\n" for line in printed))  # what a good batch printed is kept
            except RuntimeError:  # the files are tried one by one below, each failure said once
                self.graph = self._build()
                for i in range(lo, min(lo + self.max_batch, len(crops))):
                    try:
                        with captured_stderr() as printed:
                            views[i:i + 1] = self._run(encoded[i:i + 1], crops[i:i + 1])
                    except RuntimeError:
                        errors[i] = f"cannot decode image (DALI: {decode_failure(printed)})"
                        self.graph = self._build()
        return views.permute(0, 3, 1, 2).contiguous(), errors  # (N, 3, S, S)

    def _run(self, encoded: Sequence[np.ndarray], crops: np.ndarray) -> Tensor:
        """One graph run over len(crops) <= max_batch views -> (n, S, S, 3) uint8 on the device."""
        feeds = graph_feeds(encoded, crops, self.size)
        if self.device.type != "cuda":
            (out,) = self.graph.run(**feeds)
            return torch.from_numpy(out.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        (out,) = self.graph.run(stream, **feeds)  # outputs ordered on torch's stream, no host wait
        views = torch.empty(len(crops), self.size, self.size, 3, dtype=torch.uint8, device=self.device)
        feed_ndarray(out.as_tensor(), views, cuda_stream=stream)
        return views


def graph_feeds(encoded: Sequence[np.ndarray], crops: np.ndarray, size: int) -> dict[str, list[np.ndarray]]:
    """`view_graph`'s inputs for a batch: the files and, per view, its `decode_window` and flip (host work)."""
    windows = [decode_window(ViewParams.from_array(c), size) for c in crops]
    return {"encoded": [np.frombuffer(e, np.uint8) for e in encoded],
            "anchor": [np.asarray(w[0], np.int32) for w in windows],
            "shape": [np.asarray(w[1], np.int32) for w in windows],
            "start": [np.asarray(w[2], np.float32) for w in windows],
            "end": [np.asarray(w[3], np.float32) for w in windows],
            "flip": [np.asarray(int(c[4]), np.int32) for c in crops]}
