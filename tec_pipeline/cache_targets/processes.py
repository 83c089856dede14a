"""Stage one under ``accelerate launch``: every process computes its own contiguous range of
shards (no file ever has two writers); rank 0 creates the cache and, once everyone is done,
finalizes it. With one process each helper here is the identity or a plain call.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from ..cache.store import create_cache
from ..errors import UserError

T = TypeVar("T")

def process_state():
    """accelerate's PartialState; on a machine without CUDA it must be told to use CPU
    (gloo), or a multi-process launch would quietly run as independent single processes."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def own_shards(num_shards: int, rank: int, world: int) -> range:
    """This process's contiguous part of `num_shards` shards (shard-aligned: no file has two writers)."""
    per, extra = divmod(num_shards, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def broadcast(obj: Any, state) -> Any:
    """Rank 0's `obj` on every process."""
    if state.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, state) -> list:
    """Every process's `obj`, in rank order."""
    if state.num_processes == 1:
        return [obj]
    out: list = [None] * state.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T], state) -> T | None:
    """``fn()`` on rank 0 alone, the others waiting for it (None there). Whatever stops it on rank 0
    is sent to every process, so none waits forever: a refusal (`UserError`) is raised everywhere
    as it reads; any other error is raised on rank 0 as it was, and named in one line on the others."""
    result, error, failure = None, None, None
    if state.is_main_process:
        try:
            result = fn()
        except Exception as err:
            if state.num_processes == 1:
                raise
            failure = err
            error = str(err) if isinstance(err, UserError) else f"rank 0 stopped: {type(err).__name__}: {err}"
    error = broadcast(error, state)
    if failure is not None and not isinstance(failure, UserError):
        raise failure
    if error is not None:
        raise UserError(error)
    return result


def open_for_writing(url: str, meta: dict, overwrite: bool, state):
    """Rank 0 creates (or checks, repairs and reopens) the cache and holds its writing lock until
    the writer is closed; the others reopen it afterwards (`on_main`: a refusal on rank 0, another
    run holding the lock included, stops every process)."""
    writer = on_main(lambda: create_cache(url, meta, overwrite=overwrite, owner=True), state)
    if not state.is_main_process:
        writer = create_cache(url, meta, overwrite=False)
    return writer


def split_pending(writer, state) -> tuple[list[int], list[int]]:
    """(every shard still to do, this process's contiguous slice of them). Rank 0 lists them once,
    before anyone writes, and the slices are of that list, so a resumed run is balanced too."""
    pending = broadcast([s for s in range(writer.num_shards) if not writer.is_done(s)]
                        if state.is_main_process else None, state)
    mine = [pending[i] for i in own_shards(len(pending), state.process_index, state.num_processes)]
    return pending, mine
