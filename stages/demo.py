"""The default run: a CPU-sized TEC experiment that shows whether the new model surpasses its base.

Orchestration only. On the built-in demo digits (`tec_pipeline.demo.data`) and a small MAE base
made by this pipeline (`configs/demo_base.yaml`, shipped under `assets/demo_base/`):

1. build the data (once), 2. cache the base's targets (stage one), 3. train TEC from the cache
(stage two), 4. train the control: the base's own MAE run continued for as many steps as TEC
trains (the fair "just train longer"), 5. export both, 6. evaluate random-init, pixels, base,
control and TEC the same way (k-NN and linear probe), 7. draw the pictures, and print one table
with the wall time of every stage and the cache size. TEC's run is watched while it trains
(``train.monitor`` in `configs/demo.yaml`): its score against the base's is printed at each
evaluation, summed up in the report and drawn in ``monitor.png``.

What the report says (verdict, margins, stage times) is `tec_pipeline.demo.report`. The demo's
set-up (`tec_pipeline.demo.settings`: `demo_configs`, `demo_data_settings`, `BASE_DIR`) and its
evaluation (`tec_pipeline.demo.evaluation.evaluate_on_demo`) are also what the studies under
`experiments/` build on (several seeds, the shipped base, fine-tuning, caching costs), with
`run_train_and_export` here.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from tec_pipeline.config import Config
from tec_pipeline.demo.evaluation import evaluate_on_demo
from tec_pipeline.demo.report import Timer, format_report, margins, monitor_summary, split_file, verdict
from tec_pipeline.demo.settings import BASE_DIR, demo_configs, demo_data_settings
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json
from tec_pipeline.places import CACHE_FILE, IDENTITY_FILE


def tec_steps(cfg: Config) -> int:
    """Optimizer steps of the TEC run, read back from its log; the control trains as many."""
    with open(Path(cfg.output) / "log.jsonl") as f:
        return max(json.loads(line)["step"] for line in f if line.strip())


def run_train_and_export(cfg: Config, out: Optional[Path] = None) -> tuple[dict, Path]:
    """Train (a finished or interrupted run is resumed) and export the encoder; (summary, export)."""
    from tec_pipeline.stages.train import run_train
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
    from tec_pipeline.viz import plot_attention, plot_loss_curves, plot_monitor

    curves = plot_loss_curves({"tec": Path(tec.output) / "log.jsonl", "control": out / "control" / "log.jsonl"},
                              out / "loss_curves.png")
    watched = [plot_monitor(Path(tec.output) / "log.jsonl", out / "monitor.png")] if tec.train.monitor.train else []
    test = ImageFolderSource(Path(tec.data.path) / "test")
    picked = range(0, len(test), max(1, len(test) // count))[:count]
    images = normalize(torch.stack([torch.from_numpy(np.array(test.load(i))).permute(2, 0, 1) for i in picked]))
    base = load_base_model(None, tec.base.checkpoint)
    new = load_base_model(None, tec_encoder)
    attention = plot_attention(base, new, images, tec.targets.k, tec.targets.tau, out / "attention.png")
    return [curves, *watched, attention]


def _watched(tec: Config) -> Optional[dict]:
    """The monitor's summary of TEC's run (`demo.report.monitor_summary`), None where it is not watched."""
    from tec_pipeline.export import CHECKPOINT
    from tec_pipeline.train.checkpoint import load_checkpoint

    if not tec.train.monitor.train:
        return None
    state = load_checkpoint(Path(tec.output) / CHECKPOINT).get("monitor")
    return monitor_summary(state) if state else None


# What the demo writes into its folder; the reports and pictures are replaced only in a folder that
# holds the demo's own TEC run or cache, so a file of the user's with one of these names is never
# overwritten.
DEMO_FILES = ("report.json", "report_val.json", "eval.json", "eval_val.json", "loss_curves.png", "monitor.png",
              "attention.png")
DEMO_FOLDERS = ("cache.zarr", "tec", "control", "round2", "round2_cache.zarr")


def check_demo_folder(out: Path) -> None:
    """Refuse, in one line, a demo folder that holds anything the demo does not write, or the
    demo's file names with no demo run beside them (a user's folder): the demo would overwrite them."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: a file, not a folder for the demo's run")
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    foreign = sorted(e for e in entries - set(DEMO_FILES) - set(DEMO_FOLDERS)
                     if not any(e.startswith(f"{name}.tmp-") for name in DEMO_FILES))  # a killed write's leftover
    ours = (out / "tec" / IDENTITY_FILE).is_file() or (out / "cache.zarr" / CACHE_FILE).is_file()
    if foreign or (entries & set(DEMO_FILES) and not ours):
        what = f"'{foreign[0]}'" if foreign else f"'{sorted(entries & set(DEMO_FILES))[0]}' but no demo run"
        raise UserError(f"{out}: holds {what}; the demo writes its run, cache, reports and pictures there and "
                        f"would overwrite what is not its own: give a new or empty folder")


def run_demo(out: str | Path = "runs/demo", seed: int = 0, second_round: bool = False,
             overrides: Optional[list[str]] = None, base_dir: str | Path = BASE_DIR, split: str = "test") -> dict:
    """The main job: data, cache, TEC, control, export, eval, pictures; returns the report.

    `split` "val" scores on a held-out fifth of the training digits (`evaluate_models`)
    instead of the test digits: what to compare when choosing a setting; TEC's run is then not
    watched (``train.monitor`` scores the test digits).
    """
    from tec_pipeline.stages.cache_targets import run_cache_targets
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.demo.data import build_demo_data

    out = Path(out)
    check_demo_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    unwatched = ["train.monitor.train=''", "train.monitor.val=''"] if split == "val" else []  # it reads the test digits
    tec, control = demo_configs(out, seed, [*unwatched, *(overrides or [])], Path(base_dir))
    timer = Timer()
    with timer.stage("data"):
        root = Path(tec.data.path)
        build_demo_data(root, **demo_data_settings())
    with timer.stage("cache-targets"):
        run_cache_targets(tec)
    with timer.stage("train TEC"):
        _, tec_encoder = run_train_and_export(tec)
    with timer.stage("train control"):
        control = replace(control, train=replace(control.train, max_steps=tec_steps(tec)))
        _, control_encoder = run_train_and_export(control)
    models = [("base", None, tec.base.checkpoint), ("control", None, str(control_encoder)),
              ("tec", None, str(tec_encoder))]
    if second_round:
        with timer.stage("second round"):
            models.append(("tec-round2", None, str(_second_round(tec, tec_encoder, out))))
    with timer.stage("eval"):
        rows, scored = evaluate_on_demo(models, root, out / split_file("eval", split), seed, split)
    with timer.stage("pictures"):
        pictures = _pictures(tec, out, tec_encoder)
    report = {"seed": seed, "split": split, "overrides": list(overrides or []), "rows": rows,
              "margins": margins(rows, scored), "wall_s": timer.stages, "cache_bytes": open_cache(tec.cache.path).nbytes(),
              "tec_steps": tec_steps(tec), "pictures": [str(p) for p in pictures], "verdict": verdict(rows)}
    watched = _watched(tec)
    if watched:
        report["monitor"] = watched
    write_json(out / split_file("report", split), report)
    print(format_report(report))
    return report


def _second_round(tec: Config, tec_encoder: Path, out: Path) -> Path:
    """Tab. 7: the exported TEC model becomes the base of a new cache and a new TEC run."""
    from tec_pipeline.stages.cache_targets import run_cache_targets

    cfg = replace(tec, output=str(out / "round2"), base=replace(tec.base, checkpoint=str(tec_encoder)),
                  cache=replace(tec.cache, path=str(out / "round2_cache.zarr")))
    run_cache_targets(cfg)
    return run_train_and_export(cfg)[1]
