"""The default run: a CPU-sized TEC experiment that shows whether the new model surpasses its base.

Orchestration only. On the built-in demo digits (`tec_pipeline.data.demo`) and a small MAE base
made by this pipeline (`configs/demo_base.yaml`, shipped under `assets/demo_base/`):

1. build the data (once), 2. cache the base's targets (stage one), 3. train TEC from the cache
(stage two), 4. train the control: the base's own MAE run continued for as many steps as TEC
trains (the fair "just train longer"), 5. export both, 6. evaluate random-init, pixels, base,
control and TEC the same way (k-NN and linear probe), 7. draw the pictures, and print one table
with the wall time of every stage and the cache size.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from tec_pipeline.config import Config, load_config
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
BASE_CONFIG = REPO / "configs" / "demo_base.yaml"
BASE_DIR = REPO / "assets" / "demo_base"
# Mean of patch tokens: the MAE base never trains its cls token, so cls pooling would favour TEC.
EVAL_POOL = "mean"


class Timer:
    """Wall time per named stage, in order."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield
        finally:
            self.stages[name] = time.perf_counter() - start


def demo_configs(out: Path, seed: int, overrides: list[str], base_dir: Path = BASE_DIR) -> tuple[Config, Config]:
    """(TEC config, control config) of one demo run under `out`, the seed applied to both."""
    base_ckpt = base_dir / "encoder.safetensors"
    if not base_ckpt.is_file():
        raise UserError(f"{base_ckpt}: the demo base model is missing; make it with `tec-pipeline demo-base`")
    common = [f"seed={seed}"]
    tec = load_config(DEMO_CONFIG, [*common, f"output={out / 'tec'}", f"base.checkpoint={base_ckpt}",
                                    f"cache.path={out / 'cache.zarr'}", *overrides])
    control = load_config(BASE_CONFIG, [*common, f"output={out / 'control'}",
                                        f"model.init_checkpoint={base_dir / 'model.safetensors'}",
                                        f"data.path={tec.data.path}"])
    return tec, control


def tec_steps(cfg: Config) -> int:
    """Optimizer steps of the TEC run, read back from its log; the control trains as many."""
    with open(Path(cfg.output) / "log.jsonl") as f:
        return max(json.loads(line)["step"] for line in f if line.strip())


def _train_and_export(cfg: Config, out: Optional[Path] = None) -> tuple[dict, Path]:
    """Train (a finished or interrupted run is resumed) and export the encoder; (summary, export)."""
    from stages.train import run_train
    from tec_pipeline.export import CHECKPOINT, export_run

    summary = run_train(cfg, resume=(Path(cfg.output) / CHECKPOINT).exists())
    return summary, export_run(cfg.output, out)


def _pictures(tec: Config, out: Path, tec_encoder: Path, count: int = 6) -> list[Path]:
    """Loss curves of TEC and the control, and base vs TEC attention on a few test images."""
    import numpy as np
    import torch

    from tec_pipeline.data.sources import ImageFolderSource
    from tec_pipeline.models.base import load_base_model
    from tec_pipeline.views import normalize
    from tec_pipeline.viz import plot_attention, plot_loss_curves

    curves = plot_loss_curves({"tec": Path(tec.output) / "log.jsonl", "control": out / "control" / "log.jsonl"},
                              out / "loss_curves.png")
    test = ImageFolderSource(Path(tec.data.path) / "test")
    picked = range(0, len(test), max(1, len(test) // count))[:count]
    images = normalize(torch.stack([torch.from_numpy(np.array(test.load(i))).permute(2, 0, 1) for i in picked]))
    base = load_base_model(None, tec.base.checkpoint)
    new = load_base_model(None, tec_encoder)
    attention = plot_attention(base, new, images, tec.targets.k, tec.targets.tau, out / "attention.png")
    return [curves, attention]


def verdict(rows: list[dict]) -> str:
    """Whether TEC beats both the base and the control, in k-NN and in linear-probe accuracy."""
    by = {r["name"]: r for r in rows}
    wins = {m: all(by["tec"][m] > by[o][m] for o in ("base", "control")) for m in ("knn", "linear")}
    if all(wins.values()):
        return "TEC beats the base and the control in k-NN and linear-probe accuracy."
    lost = ", ".join(m for m, won in wins.items() if not won)
    return f"TEC does NOT beat both the base and the control in: {lost}."


def split_file(stem: str, split: str) -> str:
    """`stem`.json for the test split, `stem`_val.json for the validation split beside it, so
    that tuning in a run folder never overwrites (or is read back as) a test result."""
    return f"{stem}.json" if split == "test" else f"{stem}_{split}.json"


def margins(rows: list[dict], groups=None) -> dict:
    """TEC's margin over the base and over the control per metric, with its 95% interval over
    the scored images, resampled by source digit when `groups` gives them (`paired_difference`):
    whether a win is larger than the evaluation set's own noise."""
    from tec_pipeline.evaluate.statistics import paired_difference

    by = {r["name"]: r for r in rows}
    return {other: {m: paired_difference(by["tec"]["hits"][m], by[other]["hits"][m], groups)
                    for m in ("knn", "linear")} for other in ("base", "control")}


def format_margins(found: dict) -> str:
    names = {"knn": "k-NN", "linear": "linear"}
    return "\n".join(f"TEC - {other:<8}" + "   ".join(
        f"{names[m]} {100 * d['diff']:+.1f} (95% CI {100 * d['low']:+.1f} to {100 * d['high']:+.1f})"
        for m, d in per.items()) for other, per in found.items())


def run_demo(out: str | Path = "runs/demo", seed: int = 0, second_round: bool = False,
             overrides: Optional[list[str]] = None, base_dir: str | Path = BASE_DIR, split: str = "test") -> dict:
    """The main job: data, cache, TEC, control, export, eval, pictures; returns the report.

    `split` "val" scores on a held-out fifth of the training digits (`evaluate_models`)
    instead of the test digits: what to compare when choosing a setting.
    """
    from stages.cache_targets import run_cache_targets
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.data.demo import build_demo_data, source_groups
    from tec_pipeline.evaluate.features import labelled_folder
    from tec_pipeline.evaluate.report import format_table, run_eval, scored_groups

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tec, control = demo_configs(out, seed, list(overrides or []), Path(base_dir))
    timer = Timer()
    with timer.stage("data"):
        root = Path(tec.data.path)
        build_demo_data(root, **_demo_data_settings())
    with timer.stage("cache-targets"):
        run_cache_targets(tec)
    with timer.stage("train TEC"):
        _, tec_encoder = _train_and_export(tec)
    with timer.stage("train control"):
        control = replace(control, train=replace(control.train, max_steps=tec_steps(tec)))
        _, control_encoder = _train_and_export(control)
    models = [("base", None, tec.base.checkpoint), ("control", None, str(control_encoder)),
              ("tec", None, str(tec_encoder))]
    if second_round:
        with timer.stage("second round"):
            models.append(("tec-round2", None, str(_second_round(tec, tec_encoder, out))))
    with timer.stage("eval"):
        train, test = labelled_folder(root / "train"), labelled_folder(root / "test")
        train_groups = source_groups(train)
        rows = run_eval(models, root / "train", root / "test", pool=EVAL_POOL,
                        output=out / split_file("eval", split), seed=seed, echo=lambda *a: None,
                        split=split, train_groups=train_groups)
    with timer.stage("pictures"):
        pictures = _pictures(tec, out, tec_encoder)
    report = {"seed": seed, "split": split, "overrides": list(overrides or []), "rows": rows,
              "margins": margins(rows, scored_groups(split, train.labels, train_groups, source_groups(test))),
              "wall_s": timer.stages, "cache_bytes": open_cache(tec.cache.path).nbytes(),
              "tec_steps": tec_steps(tec), "pictures": [str(p) for p in pictures], "verdict": verdict(rows)}
    write_json(out / split_file("report", split), report)
    print(format_table(rows))
    print(format_stages(timer.stages, report["cache_bytes"]))
    print(report["verdict"])
    print(format_margins(report["margins"]))
    return report


def make_demo_base(out: str | Path = BASE_DIR, overrides: Optional[list[str]] = None) -> dict:
    """Train the demo's MAE base (`configs/demo_base.yaml`) and write what the demo starts from.

    `out/encoder.safetensors` is the base (a tec-pipeline export); `out/model.safetensors` holds
    the whole MAE model (encoder + decoder) so the control can continue its own objective;
    `out/base.json` records config, steps, final loss and wall time.
    """
    from safetensors.torch import save_file

    from tec_pipeline.config import to_dict
    from tec_pipeline.data.demo import build_demo_data
    from tec_pipeline.export import CHECKPOINT, load_checkpoint

    out = Path(out)
    cfg = load_config(BASE_CONFIG, list(overrides or []))
    start = time.perf_counter()
    build_demo_data(cfg.data.path, **_demo_data_settings())
    summary, _ = _train_and_export(cfg, out / "encoder.safetensors")
    state = load_checkpoint(Path(cfg.output) / CHECKPOINT)["model"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    record = {"command": "tec-pipeline demo-base " + " ".join(overrides or []), "config": to_dict(cfg),
              "steps": summary["step"], "losses": summary["losses"], "wall_s": round(time.perf_counter() - start, 1)}
    write_json(out / "base.json", record)
    return record


def _second_round(tec: Config, tec_encoder: Path, out: Path) -> Path:
    """Tab. 7: the exported TEC model becomes the base of a new cache and a new TEC run."""
    from stages.cache_targets import run_cache_targets

    cfg = replace(tec, output=str(out / "round2"), base=replace(tec.base, checkpoint=str(tec_encoder)),
                  cache=replace(tec.cache, path=str(out / "round2_cache.zarr")))
    run_cache_targets(cfg)
    return _train_and_export(cfg)[1]


def _demo_data_settings() -> dict:
    """The demo set: 5,000 train and 1,000 test digits at the default difficulty, data seed 0.

    Fixed on purpose: every demo seed and the shipped base see the same images.
    """
    return {"train_size": 5000, "test_size": 1000, "difficulty": 0.5, "seed": 0}


def format_stages(stages: dict[str, float], cache_bytes: int) -> str:
    lines = [f"{'stage':<16}{'wall s':>9}"] + [f"{name:<16}{sec:>9.1f}" for name, sec in stages.items()]
    lines.append(f"{'total':<16}{sum(stages.values()):>9.1f}")
    lines.append(f"cache size: {cache_bytes / 1e6:.1f} MB")
    return "\n".join(lines)


def _report_or_run(out: Path, seed: int, overrides: Optional[list[str]], split: str) -> dict:
    """A finished seed's report is read back (seeds can run in parallel processes), else the demo runs.

    A report made with other overrides is refused: averaging it would mix two settings.
    """
    path = out / split_file("report", split)
    if not path.is_file():
        return run_demo(out, seed=seed, overrides=overrides, split=split)
    report, now = json.loads(path.read_text()), list(overrides or [])
    was = report.get("overrides", now)  # a report from before overrides were recorded: not compared
    if was != now:
        raise UserError(f"{path} was made with overrides {was or 'none'}, this summary asks for {now or 'none'}; "
                        "give the same overrides or another --out")
    return report


def run_demo_seeds(seeds: list[int], out: str | Path = "runs/demo_seeds", overrides: Optional[list[str]] = None,
                   split: str = "test") -> dict:
    """The demo once per seed (views, masks, initialisation), then mean and spread per model."""
    import numpy as np

    out = Path(out)
    reports = [_report_or_run(out / f"seed{s}", s, overrides, split) for s in seeds]
    summary = {}
    for name in [r["name"] for r in reports[0]["rows"]]:
        rows = [next(r for r in rep["rows"] if r["name"] == name) for rep in reports]
        summary[name] = {m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows])),
                             "values": [r[m] for r in rows]} for m in ("knn", "linear")}
    wins = sum(rep["verdict"].startswith("TEC beats") for rep in reports)
    # Wins whose 95% interval over the scored images excludes 0, counted over every (seed, metric,
    # opponent); reports written before margins were recorded are left out of the count.
    margin_list = [d for rep in reports for per in rep.get("margins", {}).values() for d in per.values()]
    result = {"seeds": seeds, "split": split, "summary": summary, "tec_wins": f"{wins}/{len(seeds)}",
              "clear_margins": f"{sum(d['low'] > 0 for d in margin_list)}/{len(margin_list)}",
              "wall_s": [sum(rep["wall_s"].values()) for rep in reports]}
    write_json(out / split_file("seeds", split), result)
    print(f"{'model':<12}{'k-NN mean +- std':>20}{'linear mean +- std':>22}")
    for name, m in summary.items():
        print(f"{name:<12}{m['knn']['mean']:>12.3f} +- {m['knn']['std']:.3f}{m['linear']['mean']:>14.3f} +- "
              f"{m['linear']['std']:.3f}")
    print(f"TEC beats base and control in both metrics in {result['tec_wins']} seeds")
    for seed, rep in zip(seeds, reports):
        if "margins" in rep:
            print(f"seed {seed}:\n{format_margins(rep['margins'])}")
    if margin_list:
        print(f"margins whose 95% interval over the scored images excludes 0: {result['clear_margins']}")
    return result
