"""Shared by the tests: tiny architectures (32-px images, a few layers) and multi-process runs."""
import multiprocessing
import os
import socket
import traceback
from typing import Callable

from tec_pipeline.config import ViTArch

TINY_BASE = ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_arch(patch_size: int = 8, embed_dim: int = 32, depth: int = 3, num_heads: int = 2) -> ViTArch:
    return ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=patch_size, embed_dim=embed_dim,
                   depth=depth, num_heads=num_heads)


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


def _as_rank(rank: int, world: int, port: int, fn: Callable[..., object], args: tuple) -> None:
    code = 1
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                          ACCELERATE_USE_CPU="true")
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
