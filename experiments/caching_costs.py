"""What caching costs the new model: fixed cached views against fresh crops, the number of
views V, and lossy storage, each trained and scored on the demo.

Each variant is TEC (or the control) trained as the default run trains it, the same optimizer
steps, from one change of setting; each is scored alone on the demo's split and compared, image
by image, with its reference (`VARIANTS`): a paired 95% interval over the scored source digits.
Every finished piece (a cache, a training run, a scored row) is read back, so an interrupted
sweep resumes and several processes can share one `out` with different `--only` variants.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

from experiments.costs_report import format_costs, margins_to_reference, summarize_costs
from tec_pipeline.config import Config
from tec_pipeline.demo.evaluation import evaluate_on_demo
from tec_pipeline.demo.report import Timer, split_file
from tec_pipeline.demo.settings import demo_configs, demo_data_settings
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json
from tec_pipeline.stages.demo import run_train_and_export


class Variant(NamedTuple):
    model: str  # "tec", "control" or "base" (scored, never trained)
    overrides: tuple[str, ...]
    reference: Optional[str]  # the variant its margins are taken against


FRESH = ("data.view_mode=fresh",)
VARIANTS: dict[str, Variant] = {
    "base": Variant("base", (), None),
    "tec-fresh": Variant("tec", ("targets.source=online", *FRESH), None),  # the authors' regime
    **{f"tec-V{v}": Variant("tec", (f"data.views={v}",), "tec-fresh") for v in (1, 2, 4, 6)},
    "tec-V2-float32": Variant("tec", ("data.views=2", "cache.feat_dtype=float32", "cache.attn_dtype=float32"),
                              "tec-V2"),
    "tec-V2-int8": Variant("tec", ("data.views=2", "cache.feat_dtype=int8", "cache.attn_dtype=uint8"), "tec-V2"),
    # pq features (uint8 attention as int8's): M = 32 codes per patch stores a quarter of int8's feature
    # bytes at the demo base's width (2,048 of 8,448 B), M = 16 an eighth; each against the int8 cache
    **{f"tec-V2-pq{m}": Variant("tec", ("data.views=2", "cache.feat_dtype=pq", f"cache.pq_subvectors={m}",
                                        "cache.attn_dtype=uint8"), "tec-V2-int8") for m in (32, 16)},
    "control-fresh": Variant("control", FRESH, None),
    "control-V2": Variant("control", ("data.views=2",), "control-fresh"),  # TEC's default views, cycled
}


def tec_schedule_steps(tec: Config) -> int:
    """Optimizer steps of a demo TEC run's schedule; the control trains as many, as in the demo."""
    from tec_pipeline.train.schedule import make_schedule

    return make_schedule(tec, demo_data_settings()["train_size"], 1, tec.train.max_steps).total_steps


def variant_config(out: Path, seed: int, name: str, tec_overrides: Sequence[str] = ()) -> Config:
    """The config of one variant of one seed: the demo's TEC or control config, the variant's
    overrides last (after `tec_overrides`, which every TEC variant gets, e.g. a longer schedule);
    the cache is shared by every variant that stores the same views the same way. The control
    stops after as many steps as TEC's schedule has (its own schedule is the base's 40 epochs),
    as the demo's control does."""
    variant, run = VARIANTS[name], out / name
    if variant.model == "control":
        tec = demo_configs(out, seed, list(tec_overrides))[0]
        steps = f"train.max_steps={tec_schedule_steps(tec)}"
        return demo_configs(out, seed, [], control_overrides=[f"output={run}", steps, *variant.overrides])[1]
    tec = demo_configs(out, seed, [f"output={run}", *tec_overrides, *variant.overrides])[0]
    cache = out / f"cache-V{tec.data.views}-{stored_features(tec)}.zarr"
    return replace(tec, cache=replace(tec.cache, path=str(cache)))


def stored_features(cfg: Config) -> str:
    """How a cache stores its features, in its folder's name: the dtype, pq with its sub-vectors."""
    c = cfg.cache
    return f"pq{c.pq_subvectors}" if c.feat_dtype == "pq" else c.feat_dtype


def train_variant(cfg: Config, timer: Timer) -> tuple[Path, dict]:
    """Cache (where the variant reads one) and train, each timed by `timer`; (the exported encoder, facts)."""
    from tec_pipeline.stages.cache_targets import run_cache_targets
    from tec_pipeline.cache.store import open_cache

    cache_bytes = None
    if cfg.targets.source == "cache":
        with timer.stage("cache"):
            run_cache_targets(cfg)
        cache_bytes = open_cache(cfg.cache.path).nbytes()
    with timer.stage("train"):
        summary, encoder = run_train_and_export(cfg)
    return encoder, {"cache_bytes": cache_bytes, "views": cfg.data.views, "steps": summary["step"]}


def scored_variant(out: Path, seed: int, name: str, split: str, tec_overrides: Sequence[str] = ()) -> dict:
    """One variant's row {name, knn, linear, hits, wall_s, ...} on `split`, read back if scored
    with the same overrides (a row made with others is refused: the table would mix two settings)."""
    path, overrides = out / name / split_file("row", split), [*tec_overrides, *VARIANTS[name].overrides]
    if path.is_file():
        row = json.loads(path.read_text())
        if row["overrides"] != overrides:
            raise UserError(f"{path} was made with overrides {row['overrides']}, this sweep asks for {overrides}; "
                            "give the same --set or another --out")
        return row
    cfg, timer = variant_config(out, seed, name, tec_overrides), Timer()
    if VARIANTS[name].model == "base":
        checkpoint, facts = cfg.base.checkpoint, {}
    else:
        checkpoint, facts = train_variant(cfg, timer)
    with timer.stage("eval"):
        rows, groups = evaluate_on_demo([(name, None, str(checkpoint))], Path(cfg.data.path),
                                        out / name / split_file("eval", split), seed, split, floors=False)
    row = {**rows[0], **facts, "wall_s": timer.stages, "overrides": overrides, "groups": groups.tolist()}
    write_json(path, row)
    return row


def checked_names(only: Optional[list[str]]) -> list[str]:
    """The variants to run, in `VARIANTS` order; unknown names refused. `only` runs just those
    (not their references), so processes given disjoint lists never train the same run."""
    unknown = [n for n in only or [] if n not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant '{unknown[0]}' (one of {', '.join(VARIANTS)})")
    return [n for n in VARIANTS if not only or n in only]


def run_caching_costs(seeds: list[int], out: str | Path = "runs/caching_costs", only: Optional[list[str]] = None,
                      split: str = "test", tec_overrides: Sequence[str] = ()) -> dict:
    """Every variant (or those of `only`) for each seed, then the table: mean and spread over
    the seeds, each seed's margin over the reference (where that was run too) with its interval.
    `tec_overrides` go to every TEC variant (the control's steps follow TEC's schedule)."""
    out, names = Path(out), checked_names(only)
    rows = {seed: {n: scored_variant(out / f"seed{seed}", seed, n, split, tec_overrides) for n in names}
            for seed in seeds}
    references = {n: VARIANTS[n].reference for n in names if VARIANTS[n].reference in names}
    margins = {seed: margins_to_reference(rows[seed], references) for seed in seeds}
    result = summarize_costs(seeds, split, rows, margins)
    write_json(out / split_file("costs", split), result)
    print(format_costs(result))
    return result
