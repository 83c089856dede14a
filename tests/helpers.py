"""Shared by the tests: tiny architectures (32-px images, a few layers) and multi-process runs."""
import multiprocessing
import os
import shutil
import socket
import subprocess
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from tec_pipeline.base_targets import compute_targets
from tec_pipeline.cache.reader import ShardBuffer
from tec_pipeline.config import ViTArch
from tec_pipeline.data.sources import ImageSource
from tec_pipeline.views import draw_view, normalize

TINY_BASE = ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# The same sizes as dotted overrides: a tiny base, and a tiny new model with the data settings it trains on.
TINY_BASE_ARGS = ["base.arch.name=vit_tiny_patch16_224", "base.arch.patch_size=8", "base.arch.embed_dim=32",
                  "base.arch.depth=2", "base.arch.num_heads=2"]
TINY_MODEL_ARGS = ["model.arch.name=vit_tiny_patch16_224", "model.arch.img_size=32", "model.arch.patch_size=8",
                   "model.arch.embed_dim=32", "model.arch.depth=3", "model.arch.num_heads=2", "model.decoder_dim=32",
                   "model.decoder_heads=2", "model.decoder_depth=1", "data.img_size=32", "data.batch_size=4",
                   "optim.epochs=1", "optim.blr=0.05"]


def tiny_arch(patch_size: int = 8, embed_dim: int = 32, depth: int = 3, num_heads: int = 2) -> ViTArch:
    return ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=patch_size, embed_dim=embed_dim,
                   depth=depth, num_heads=num_heads)


def write_images(root: Path, count: int, size: Optional[tuple[int, int]] = None, classes: int = 0,
                 name: str = "{i:02d}.png", seed: int = 0) -> Path:
    """`count` random RGB PNGs under `root`: all (height, width) = `size`, or each of a random size
    in 36..55 when `size` is None; in `classes` class folders `c{i % classes}` (flat when 0)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = size if size is not None else (int(rng.integers(36, 56)), int(rng.integers(36, 56)))
        folder = root / f"c{i % classes}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name.format(i=i))
    return root


def run_as_ranks(fn: Callable[..., object], *args, world: int = 2, timeout: float = 180) -> list[int]:
    """Run `fn(*args)` in `world` forked processes set up as torchrun sets up ranks (gloo on the
    CPU, as `accelerate launch --cpu` asks for it); their exit codes, 0 for success.

    Forked, so the children share the imported torch (no 10 s re-import each); a child's
    exception is printed into the test's captured output.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_as_rank, args=(rank, world, port, fn, args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    return [p.exitcode for p in procs]


def run_alone(fn: Callable[..., object], *args, timeout: float = 180) -> int:
    """Run `fn(*args)` in one forked process that is no rank of a group (as a plain `python` or
    `tec-pipeline` command runs): accelerate's single-process path, with a state of its own
    (a run's mixed precision, say); its exit code, 0 for success."""
    proc = multiprocessing.get_context("fork").Process(target=_as_rank, args=(0, 0, 0, fn, args))
    proc.start()
    proc.join(timeout=timeout)
    return proc.exitcode


def _as_rank(rank: int, world: int, port: int, fn: Callable[..., object], args: tuple) -> None:
    """One forked process: rank `rank` of `world` (world 0: no group at all)."""
    code = 1
    try:
        if world:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
        import torch
        from accelerate.state import AcceleratorState

        # forked from a process whose single-process accelerate state is already set
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(1)
        fn(*args)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


@contextmanager
def small_filesystem(path: Path, size: str = "2m", read_only: bool = False) -> Iterator[Path]:
    """A real filesystem of `size` at `path` (tmpfs, mounted here and unmounted after), which
    runs out of space as a full disk does, or refuses every write (`read_only`; even root's, where
    file modes would not stop it). Skips the test where mounting is not permitted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_to(path: Path, free_bytes: int) -> Path:
    """A filler file on `path`'s filesystem that leaves about `free_bytes` free; delete it to
    free the space again."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, shutil.disk_usage(path).free - free_bytes)))
    return filler


class MemoryCache:
    """A complete cache held in memory with the `TargetReader` API, for tests that need no files.

    `arrays` hold every field of `read_shard` for all images: crop (N, V, 5), feat (N, V, L, C), ...
    """

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta, self.arrays = meta, arrays
        self.num_images, self.views = int(meta["num_images"]), int(meta["views"])
        self.images_per_shard = int(meta["images_per_shard"])
        self.num_shards = -(-self.num_images // self.images_per_shard)
        self.reads = 0  # read_shard calls (tests check chunk-aware reading with it)
        self.feat_codec = None  # float features: no pq parts

    @property
    def summary(self) -> dict:
        return {}  # no record of skipped images: training reads "valid" from the shards

    def is_complete(self) -> bool:
        return True

    def shard_range(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.num_images))

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        self.reads += 1
        r = self.shard_range(shard)
        return {name: a[r.start:r.stop].copy() for name, a in self.arrays.items()}

    def open_shard(self, shard: int, wanted=None) -> ShardBuffer:
        return ShardBuffer(self.read_shard(shard))

    def read_view(self, image: int, view: int) -> dict[str, np.ndarray]:
        return {name: (a[image, view] if a.ndim > 1 else a[image]) for name, a in self.arrays.items()}

    def image_bytes(self, image: int) -> Optional[bytes]:
        return None


@torch.no_grad()
def build_memory_cache(base, source: ImageSource, img_size: int, views: int, seed: int, k_max: int,
                       images_per_shard: int, last_layers: int = 2, scale: tuple[float, float] = (0.2, 1.0),
                       storage: str = "float32", batch_size: int = 16, source_path: str = "") -> MemoryCache:
    """Stage one in memory: every (image, view) rendered, base targets computed (`compute_targets`),
    stored in `storage` precision (float16 storage is rounded through float16)."""
    pairs = [(i, v) for i in range(len(source)) for v in range(views)]
    fields: dict[str, list] = {k: [] for k in ("crop", "feat", "feat_mean", "feat_std", "attn", "topk_idx")}
    for s in range(0, len(pairs), batch_size):
        chunk, pictures = pairs[s:s + batch_size], []
        for i, v in chunk:
            pixels, crop = draw_view(source.load(i), seed, i, v, img_size, scale)
            pictures.append(pixels)
            fields["crop"].append(crop.as_array())
        t = compute_targets(base, normalize(torch.stack(pictures)), last_layers, k_max)
        for name in ("feat", "feat_mean", "feat_std", "attn", "topk_idx"):
            fields[name].extend(getattr(t, name).cpu().numpy())
    n = len(source)
    arrays = {name: np.stack(v).reshape(n, views, *np.shape(v[0])) for name, v in fields.items()}
    for name in ("feat", "feat_mean", "feat_std", "attn"):
        arrays[name] = arrays[name].astype(storage).astype(np.float32)
    arrays["valid"] = np.ones(n, dtype=np.uint8)
    arrays["label"] = np.asarray([source.label(i) if hasattr(source, "label") else -1 for i in range(n)])
    L, C = arrays["feat"].shape[2:]
    meta = {"num_images": n, "views": views, "num_patches": L, "feat_dim": C, "heads": arrays["attn"].shape[3],
            "k_max": k_max, "images_per_shard": images_per_shard, "img_size": img_size,
            "identity": {"img_size": img_size, "seed": seed, "last_layers": last_layers},
            "source": {"kind": "imagefolder", "path": source_path}}
    return MemoryCache(meta, arrays)


class CountingFileSystem(LocalFileSystem):
    """This machine's disk under the protocol ``counting://``, counting the bytes reads ask for.

    A stand-in for object storage: the readers treat it as remote (not ``file``), so every read
    is an fsspec range request (``cat_file``), and `requested` is what they would fetch.
    """

    protocol = ("counting",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requested = self.requests = 0

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        self.requested += len(data)
        self.requests += 1
        return data


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
