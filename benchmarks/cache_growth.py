"""Growing the demo's cache from 2 to 4 views, killed once midway: the check of issue 34.

1. `cache-targets` with the demo config (configs/demo.yaml, 5,000 digits, float16) at V=2;
2. the same command at V=4 in a subprocess, killed with SIGKILL once `--kill-after` shards of the
   view part are durable; the cache must still read as a complete 2-view cache, every file of it
   byte-identical;
3. the rerun finishes the growth; every V=2 file is still byte-identical;
4. a V=4 cache made in one go; views 2-3 of the grown cache must equal its views 2-3 (every
   stored array, decoded: float16 is deterministic, so equal arrays are equal stored values).

Prints a table and writes the JSON (seconds of each stage on this machine, the checks).

    .venv/bin/python benchmarks/cache_growth.py --out runs/cache_growth --json benchmarks/results/cache_growth.json
    .venv/bin/python benchmarks/cache_growth.py --images 640 --per-shard 64   # 640 of the digits, 10 shards
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tec_pipeline.stages.cache_targets import run_cache_targets  # noqa: E402
from tec_pipeline.cache.growth import PART_PREFIX, part_name  # noqa: E402
from tec_pipeline.cache.reader import equal_arrays  # noqa: E402
from tec_pipeline.cache.store import open_cache  # noqa: E402
from tec_pipeline.config import load_config  # noqa: E402
from tec_pipeline.demo.data import build_demo_data  # noqa: E402
from tec_pipeline.demo.settings import demo_data_settings, demo_subset  # noqa: E402
from tec_pipeline.errors import UserError  # noqa: E402
from tec_pipeline.places import CACHE_FILE  # noqa: E402

CONFIG = REPO / "configs" / "demo.yaml"


def digests(url: Path) -> dict[str, str]:
    """sha256 of every file of the cache as made (not its metadata file, not its view parts)."""
    return {str(p.relative_to(url)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(url.rglob("*"))
            if p.is_file() and p.name != CACHE_FILE and not str(p.relative_to(url)).startswith(PART_PREFIX)}


def settings(url: Path, views: int, data: list[str]) -> list[str]:
    return [f"cache.path={url}", f"data.views={views}", *data]


def timed_cache(url: Path, views: int, data: list[str]) -> float:
    start = time.perf_counter()
    run_cache_targets(load_config(CONFIG, settings(url, views, data)))
    return time.perf_counter() - start


def kill_growth(url: Path, after: int, data: list[str]) -> dict:
    """Start the growth to 4 views in a subprocess and SIGKILL it once `after` part shards are done."""
    cmd = [sys.executable, "-m", "tec_pipeline", "cache-targets", "-c", str(CONFIG), *settings(url, 4, data)]
    # its own process group, killed whole (the loader worker too, which would hold the lock a while)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done, start = 0, time.perf_counter()
    try:
        while proc.poll() is None:
            try:
                part = open_cache(str(url / part_name(2, 4)))
                done = part.num_shards - len(part.missing_shards())
            except (UserError, OSError, ValueError):
                done = 0  # not created yet
            if done >= after:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        proc.wait()
    return {"killed_after_s": time.perf_counter() - start, "part_shards_done_at_kill": done,
            "returncode": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cache_growth"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/cache_growth.json"))
    ap.add_argument("--kill-after", type=int, default=3, help="part shards durable before the SIGKILL")
    ap.add_argument("--images", type=int, default=0, help="this many of the demo's training digits (0: all 5,000)")
    ap.add_argument("--per-shard", type=int, default=256, help="cache.images_per_shard")
    args = ap.parse_args()
    build_demo_data(Path("data/demo"), **demo_data_settings())
    shutil.rmtree(args.out, ignore_errors=True)
    data = [f"cache.images_per_shard={args.per_shard}"]
    if args.images:
        data += ["data.kind=imagefolder", f"data.path={demo_subset(Path('data/demo'), args.out, args.images)}"]
    grown, once = args.out / "grown.zarr", args.out / "once.zarr"
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_at_start": os.getloadavg()[0],
                    "images": args.images or 5000, "images_per_shard": args.per_shard}
    result["make_v2_s"] = timed_cache(grown, 2, data)
    before = digests(grown)
    result["kill"] = kill_growth(grown, args.kill_after, data)
    after_kill = open_cache(str(grown))
    result["after_kill"] = {"views": after_kill.views, "complete": after_kill.is_complete(),
                            "v2_files_unchanged": digests(grown) == before}
    result["finish_growth_s"] = timed_cache(grown, 4, data)
    result["v2_files"] = len(before)
    result["v2_files_unchanged"] = digests(grown) == before
    result["make_v4_at_once_s"] = timed_cache(once, 4, data)
    result["equal_to_made_at_once"] = equal_arrays(open_cache(str(grown)), open_cache(str(once)))
    result["lineage"] = open_cache(str(grown)).meta["lineage"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'check':<44}result")
    print(f"{'V=2 cache made (s)':<44}{result['make_v2_s']:.1f}")
    print(f"{'growth killed after (s, part shards done)':<44}{result['kill']['killed_after_s']:.1f}, "
          f"{result['kill']['part_shards_done_at_kill']}")
    print(f"{'after the kill: views, complete, files same':<44}{result['after_kill']}")
    print(f"{'rerun finishing the growth (s)':<44}{result['finish_growth_s']:.1f}")
    print(f"{'V=2 files byte-identical after growth':<44}{result['v2_files_unchanged']} ({len(before)} files)")
    print(f"{'V=4 cache made at once (s)':<44}{result['make_v4_at_once_s']:.1f}")
    print(f"{'arrays equal to the V=4 cache made at once':<44}{result['equal_to_made_at_once']}")
    print(f"{'lineage':<44}{result['lineage']}")


if __name__ == "__main__":
    main()
