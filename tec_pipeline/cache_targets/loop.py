"""Stage one's loop: a process's pending shards computed and written, batch by batch.

`compute_shards` runs the view DataLoader over the shards, has each batch's targets computed on
the compute device (`forward`, the base forward of `tec_pipeline.base_targets.view_targets`, or a
benchmark's stand-in) and encoded there into its shard (`cache.assemble.ShardAssembler`), and
hands every full shard to a pool of `cache.writer_threads` writers, so compute and storage
overlap. The driver, `stages/cache_targets.py`, calls it once per process with the shards
`processes.split_pending` gave that process.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from torch import Tensor

from ..cache.assemble import ShardAssembler, ShardWriterPool, default_writer_threads
from ..cache.encode import NonFiniteTargetError
from ..config import Config
from .view_dataset import BatchViews, ViewDataset, shard_batches, view_loader
from .settings import images_per_batch, non_finite_error
from .summary import check_bad_images, progress_bar, progress_text

Forward = Callable[[Tensor], dict[str, Tensor]]  # uint8 views (B, V, 3, S, S) -> targets on the device


def compute_shards(cfg: Config, writer, dataset: ViewDataset, forward: Forward, shards: list[int], state,
                   views_of: Optional[BatchViews] = None) -> dict:
    """Compute and write `shards` (this process's pending ones); returns this run's counts.

    `views_of` gives a batch's views (rendered on the device for ``data.loader=dali``); by default
    the loader workers rendered them.
    `forward` gives a batch's targets on the compute device; they are encoded there
    (`ShardAssembler.add`) and whole shards go to a pool of `cache.writer_threads` writers. A
    non-finite target stops the run naming `base.compute_dtype`; its shard is never queued."""
    ranges = [writer.shard_range(s) for s in shards]
    loader = view_loader(dataset, shard_batches(ranges, images_per_batch(cfg)), cfg.data.num_workers,
                         pin_memory=state.device.type == "cuda")
    bar = progress_bar(sum(len(r) for r in ranges), state)
    out = ShardWriterPool(writer, cfg.cache.writer_threads or default_writer_threads())
    start = time.perf_counter()
    try:
        views_of = views_of or BatchViews(None, dataset.views, dataset.source.name)
        images, skipped = assemble_shards(cfg, writer, loader, views_of, forward, out, bar)
        out.close()
    except NonFiniteTargetError as err:
        raise non_finite_error(err, writer.meta) from None
    finally:
        bar.close()
        out.stop()  # on an error: let the shards already queued (complete ones) finish writing
    for item in skipped:
        item["name"] = dataset.source.name(item["index"])
    return {"images": images, "views": images * dataset.views, "bytes": out.bytes_written, "skipped": skipped,
            "write_seconds": out.seconds, "shards": len(shards), "loop_seconds": time.perf_counter() - start}


def assemble_shards(cfg: Config, writer, loader, views_of: BatchViews, forward: Forward, out: ShardWriterPool,
                    bar) -> tuple[int, list]:
    """The loop: each batch's targets encoded into its shard, a full shard to the writers.
    Returns the images done and the skipped ones."""
    assembling: dict[int, ShardAssembler] = {}  # shard -> its arrays so far
    images, skipped, start = 0, [], time.perf_counter()
    for batch in loader:  # B images of one shard
        views = views_of(batch)  # (B, V, 3, S, S) uint8
        check_bad_images(batch, cfg.data.on_bad_image)
        shard = int(batch["index"][0]) // cfg.cache.images_per_shard
        if shard not in assembling:
            assembling[shard] = out.assembler(shard, bool(writer.meta.get("store_images")))
        assembling[shard].add(batch, forward(views))
        if assembling[shard].full:
            full = assembling.pop(shard)
            out.put(full)
            skipped += full.skipped
        images += len(batch["index"])
        bar.update(len(batch["index"]))
        bar.set_postfix_str(progress_text(images * views.shape[1], out.bytes_written, time.perf_counter() - start),
                            refresh=False)
    return images, skipped
