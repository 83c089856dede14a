"""Reuse at ImageNet's rate: what a cached view costs TEC when it is seen 5 to ~100 times.

A cache of V views per image trained for E epochs shows each view R = E / V times (reuse); with a
fixed image subset of N images, batch B and S optimizer steps, E = S * B / N, so

    R = S * B / (N * V).

Every arm trains the same S steps from the same base on the same N images, so only the reuse
differs: fresh crops every epoch (the online mode, `targets.source=online data.view_mode=fresh`,
R = 1: the authors' regime) against caches of V = 1, 2, 3, 8, 24 views (R = 120, 60, 40, 15, 5
at E = 120). N is small (32 of the demo's 5,000 training digits, one batch of 32: S = 120 steps) so that a reuse of ~100 fits in
a CPU budget of about an hour on 2 shared cores; every model is scored as the demo scores it
(k-NN and linear probe fitted on all 5,000 training digits, the 1,000 test digits), except that
the probe's C is fixed (`PROBE_C`) instead of chosen per model (six fits instead of one), and
compared image by image with the fresh arm of its seed (`experiments.costs_report`).

`grown` is one more arm (seed 0): the V=8 cache grown to V=24 by `cache-targets`, trained as the
V=24 arm; it must give the same training as the V=24 cache made in one go.

Every finished piece (subset, cache, run, row) is read back, so an interrupted study resumes,
and the summary is rewritten after every seed, so a partial run keeps what finished.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

from experiments.costs_report import format_costs, margins_to_reference, summarize_costs
from experiments.reuse_report import first_resolved
from tec_pipeline.config import Config
from tec_pipeline.demo.evaluation import evaluate_on_demo
from tec_pipeline.demo.report import Timer
from tec_pipeline.demo.settings import demo_configs, demo_data_settings, demo_subset
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json
from tec_pipeline.stages.demo import run_train_and_export

IMAGES = 32  # the subset: one batch per epoch, so S = EPOCHS steps
BATCH = 32
PROBE_C = 1.0  # one linear-probe C for every arm (the C the demo protocol chose for fresh crops, seed 0)
EPOCHS = 120  # R = EPOCHS / V
WARMUP_EPOCHS = 20  # a sixth of the run, as the demo's 1 of 6 epochs


class Arm(NamedTuple):
    views: Optional[int]  # None: fresh crops online
    grown_from: Optional[int] = None  # the cache is made at this V, then grown to `views`


ARMS: dict[str, Arm] = {"fresh": Arm(None), **{f"V{v}": Arm(v) for v in (1, 2, 3, 8, 24)}, "V24-grown": Arm(24, 8)}
REFERENCE = "fresh"


def reuse_of(arm: Arm) -> float:
    """How many times each cached view is seen: epochs / views (1 for fresh crops)."""
    return 1.0 if arm.views is None else EPOCHS / arm.views


def arm_config(out: Path, seed: int, name: str, images: Path) -> Config:
    """The demo's TEC config on the subset, S steps, unwatched (the monitor scores the test digits
    at a cost every arm would pay), with the arm's views; its cache under out/caches/."""
    arm = ARMS[name]
    settings = [f"output={out / f'seed{seed}' / name}", "data.kind=imagefolder", f"data.path={images}",
                f"data.batch_size={BATCH}", f"optim.epochs={EPOCHS}", f"optim.warmup_epochs={WARMUP_EPOCHS}",
                'train.monitor.train=""', 'train.monitor.val=""']
    if arm.views is None:
        return demo_configs(out, seed, [*settings, "targets.source=online", "data.view_mode=fresh"])[0]
    tec = demo_configs(out, seed, [*settings, f"data.views={arm.views}"])[0]
    cache = out / "caches" / f"seed{seed}-V{arm.views}{'-grown' if arm.grown_from else ''}.zarr"
    return replace(tec, cache=replace(tec.cache, path=str(cache)))


def made_cache(cfg: Config, arm: Arm) -> int:
    """Stage one for an arm (its grown arm: made at `grown_from` views, then grown); the cache bytes."""
    from tec_pipeline.stages.cache_targets import run_cache_targets
    from tec_pipeline.cache.store import open_cache

    if arm.grown_from:
        run_cache_targets(replace(cfg, data=replace(cfg.data, views=arm.grown_from)))
    run_cache_targets(cfg)
    return open_cache(cfg.cache.path).nbytes()


def scored_arm(out: Path, seed: int, name: str, images: Path, data_root: Path) -> dict:
    """One arm's row {name, knn, linear, hits, groups, wall_s, reuse, ...}, read back if it exists."""
    path = out / f"seed{seed}" / name / "row.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg, arm, timer = arm_config(out, seed, name, images), ARMS[name], Timer()
    cache_bytes = None
    if arm.views is not None:
        with timer.stage("cache"):
            cache_bytes = made_cache(cfg, arm)
    with timer.stage("train"):
        summary, encoder = run_train_and_export(cfg)
    with timer.stage("eval"):
        rows, groups = evaluate_on_demo([(name, None, str(encoder))], data_root, path.parent / "eval.json", seed,
                                        "test", floors=False, probe_C=PROBE_C)
    row = {**rows[0], "views": arm.views, "reuse": reuse_of(arm), "steps": summary["step"],
           "cache_bytes": cache_bytes, "wall_s": timer.stages, "groups": groups.tolist(),
           "images": IMAGES, "epochs": EPOCHS, "batch": BATCH, "probe_C": PROBE_C}
    write_json(path, row)
    return row


def grown_check(out: Path, seed: int) -> dict:
    """The grown arm against the V=24 arm made in one go: every stored array of the two caches,
    and the losses of every logged step of the two runs (equal, not close: the same training)."""
    from tec_pipeline.cache.reader import equal_arrays
    from tec_pipeline.cache.store import open_cache

    caches = [open_cache(str(out / "caches" / f"seed{seed}-V24{tail}.zarr")) for tail in ("", "-grown")]
    same_arrays = all(equal_arrays(*caches).values())
    logs = [[{k: v for k, v in json.loads(line).items() if k.startswith("loss")}
             for line in (out / f"seed{seed}" / name / "log.jsonl").read_text().splitlines()]
            for name in ("V24", "V24-grown")]
    return {"same_arrays": same_arrays, "same_losses": logs[0] == logs[1], "logged_steps": len(logs[0]),
            "lineage": caches[1].meta.get("lineage")}


def checked_arms(only: Optional[list[str]]) -> list[str]:
    """The arms to run in `ARMS` order (all but the grown one by default); unknown names refused."""
    unknown = [n for n in only or [] if n not in ARMS]
    if unknown:
        raise UserError(f"unknown arm '{unknown[0]}' (one of {', '.join(ARMS)})")
    return [n for n in ARMS if n in only] if only else [n for n in ARMS if not ARMS[n].grown_from]


def run_reuse(seeds: list[int], out: str | Path = "runs/reuse", only: Optional[list[str]] = None) -> dict:
    """Every arm of every seed, then the table (`costs_report`) with each arm's reuse; the summary
    (reuse.json) is rewritten after each seed with the seeds finished so far."""
    from tec_pipeline.demo.data import build_demo_data

    out, names = Path(out), checked_arms(only)
    data_root = Path(demo_configs(out, seeds[0], [])[0].data.path)
    build_demo_data(data_root, **demo_data_settings())
    images = demo_subset(data_root, out, IMAGES)
    rows: dict[int, dict] = {}
    result: dict = {}
    for seed in seeds:
        rows[seed] = {n: scored_arm(out, seed, n, images, data_root) for n in names}
        done = list(rows)
        references = {n: REFERENCE for n in names if n != REFERENCE and REFERENCE in names}
        margins = {s: margins_to_reference(rows[s], references) for s in done}
        result = summarize_costs(done, "test", rows, margins)
        for name, v in result["variants"].items():
            v["reuse"] = rows[done[0]][name]["reuse"]
        result.update(images=IMAGES, epochs=EPOCHS, steps=rows[done[0]][names[0]]["steps"])
        result["first_resolved_cost"] = first_resolved(result) if len(done) > 1 else None
        if "V24-grown" in names:
            result["grown"] = {s: grown_check(out, s) for s in done}
        write_json(out / ("reuse.json" if not only else f"reuse-{'-'.join(names)}.json"), result)
        print(format_costs(result), f"\nfirst resolved cost: {result['first_resolved_cost']}", flush=True)
    return result
