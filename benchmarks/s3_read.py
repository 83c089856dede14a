"""Stage two reading from an S3 endpoint: views/s per loader worker, and bytes requested.

Starts moto's S3 server on 127.0.0.1 (the same test endpoint the tests use), writes a cache of
ViT-B/16-shaped int8/uint8 targets to a bucket through s3fs, and reads one `cycle` epoch as
training does (targets only) with 0 loader workers (one process) and with 2. The endpoint is
local and in memory: this measures the client path (HTTP range requests, s3fs, decoding), not a
real object store's latency or bandwidth.

    .venv/bin/python benchmarks/s3_read.py --repeats 3 --out benchmarks/results/s3_read.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_amplification import Requested, epoch_plan, used_bytes, write_cache  # noqa: E402
from tec_pipeline.cache.store import open_cache  # noqa: E402
from tec_pipeline.train.batches import CachedBatches  # noqa: E402
from tec_pipeline.train.loader import epoch_loader  # noqa: E402


def start_endpoint() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    return os.environ["AWS_ENDPOINT_URL"]


def read_epoch(url: str, workers: int, epoch: int, args) -> dict:
    reader = open_cache(url)
    plan = epoch_plan(reader, "cycle", epoch, args.batch)
    start = time.perf_counter()
    with Requested() as requested:  # counts this process's requests only (workers: see the docstring)
        make = CachedBatches(reader, None, 32, 16, buffer_shards=2, render=False)
        for _ in epoch_loader(plan, make, 0, workers):
            pass
    seconds = time.perf_counter() - start
    return {"views_per_s": plan.images.size / seconds, "seconds": seconds, "used_bytes": used_bytes(reader, plan),
            "requested_bytes": requested.bytes if workers == 0 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--shape", default="vitb")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    start_endpoint()
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    url = f"s3://{bucket}/cache.zarr"
    write_cache(url, "zarr", args)
    rows = []
    for workers in (0, 2):
        runs = [read_epoch(url, workers, epoch, args) for epoch in range(1, args.repeats + 1)]
        rates = [r["views_per_s"] for r in runs]
        rows.append({"workers": workers, "views_per_s": {"median": statistics.median(rates), "min": min(rates),
                                                        "max": max(rates), "runs": rates},
                     "used_bytes": runs[0]["used_bytes"], "requested_bytes": runs[0]["requested_bytes"]})
    print(f"S3 endpoint on 127.0.0.1 (moto, in memory), zarr, {args.images} images x {args.views} views, "
          f"{args.shape} int8/uint8, cycle epoch, {args.repeats} runs")
    print(f"{'workers':<9}{'views/s median (min-max)':>28}{'used MB':>10}{'requested MB':>14}")
    for r in rows:
        v, req = r["views_per_s"], r["requested_bytes"]
        print(f"{r['workers']:<9}{v['median']:>14.0f} ({v['min']:.0f}-{v['max']:.0f})".ljust(37)
              + f"{r['used_bytes'] / 1e6:>10.1f}{'-' if req is None else f'{req / 1e6:.1f}':>14}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
