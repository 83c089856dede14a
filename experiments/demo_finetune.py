"""`python -m experiments demo-finetune`: the demo's question asked by the paper's protocol (Tab. 10). Base,
control and TEC of a finished demo run are each fine-tuned on the demo's train digits
(configs/finetune_demo.yaml) and scored on its test digits; per seed, TEC's top-1 margins over the
base and the control with their paired 95% intervals, resampled by source digit as the demo's are
(`evaluate.statistics.paired_difference`); over seeds, mean and spread. The source digits are the
demo build's groups files: ``data.groups`` (the held-out fifth of ``data.split=val``) is the train
split's, the scored images' groups are read from the same files.

A driver: fine-tuning is `tec_pipeline.stages.finetune.run_finetune`; this module picks the three
encoders and reads the results as the demo report reads its rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tec_pipeline.stages.finetune import run_finetune
from tec_pipeline.demo.data import group_files
from tec_pipeline.demo.report import OPPONENTS, split_file
from tec_pipeline.demo.settings import BASE_DIR
from tec_pipeline.errors import UserError
from tec_pipeline.evaluate.groups import read_groups
from tec_pipeline.evaluate.statistics import paired_difference
from tec_pipeline.export import CHECKPOINT, EXPORT_NAME
from tec_pipeline.files import write_json
from tec_pipeline.finetune.config import load_finetune_config
from tec_pipeline.finetune.splits import open_splits

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune_demo.yaml"
BASE = BASE_DIR / EXPORT_NAME


def demo_encoders(run: Path, seed: int) -> dict[str, Path]:
    """The three encoders the demo compares: the shipped base, and the control and TEC exports of the
    run's seed folder (`demo-seeds` writes RUN/seed<N>) where there is one, else of RUN itself."""
    run = run / f"seed{seed}" if (run / f"seed{seed}").is_dir() else run
    return {"base": BASE, "control": run / "control" / EXPORT_NAME, "tec": run / "tec" / EXPORT_NAME}


def finetune_one(checkpoint: Path, out: Path, seed: int, overrides: Sequence[str]) -> dict:
    """One fine-tune of the demo config, resumed where interrupted, read back where finished."""
    cfg = load_finetune_config(CONFIG, [f"seed={seed}", f"model.checkpoint={checkpoint}", f"output={out}", *overrides])
    return run_finetune(cfg, resume=(out / CHECKPOINT).exists())


def seed_margins(results: dict[str, dict], groups: Optional[np.ndarray]) -> dict:
    """TEC's top-1 margin over each opponent, with its 95% interval over the scored digits."""
    return {other: paired_difference(results["tec"]["hits"], results[other]["hits"], groups) for other in OPPONENTS}


def summary_lines(per_seed: list[dict]) -> list[str]:
    """Per model top-1 mean and spread over seeds; per seed TEC's margins in points with intervals."""
    lines = []
    for name in ("base", "control", "tec"):
        top1 = np.array([s["top1"][name] for s in per_seed])
        lines.append(f"{name:<8} top-1 {top1.mean():6.2f} +- {top1.std():.2f} over {len(top1)} seed(s)")
    for s in per_seed:
        lines.append(f"seed {s['seed']}: " + "   ".join(
            f"TEC - {o} {100 * d['diff']:+.1f} (95% CI {100 * d['low']:+.1f} to {100 * d['high']:+.1f})"
            for o, d in s["margins"].items()))
    return lines


def scored_groups(cfg, test_groups: str | Path) -> np.ndarray:
    """The group of each scored image, in scoring order (`open_splits`' val set): from
    `test_groups` for the test folder, or with ``data.split`` "val" from ``data.groups`` for the
    fifth of the train folder held out."""
    _, scored, _ = open_splits(cfg)
    path = cfg.data.groups if cfg.data.split == "val" else test_groups
    return read_groups(path, scored.source)[scored.indices]


def with_demo_groups(overrides: Sequence[str]) -> tuple[list[str], Path]:
    """`overrides` after ``data.groups`` set to the train groups file of the demo build that
    ``data.train`` lies in (an explicit ``data.groups`` among `overrides` still wins), and that
    build's test groups file."""
    train = Path(load_finetune_config(CONFIG, list(overrides)).data.train)
    files = group_files(train.parent)
    return [f"data.groups={files['train']}", *overrides], files["test"]


def run_demo_finetune(run: Path, seeds: Sequence[int], out: Optional[Path] = None,
                      overrides: Sequence[str] = (), split: str = "test") -> dict:
    """Fine-tune base, control and TEC per seed; write OUT/finetune[_val].json and print the summary."""
    run = Path(run)
    out = Path(out) if out is not None else run / ("finetune" if split == "test" else "finetune_val")
    encoders = {seed: demo_encoders(run, seed) for seed in seeds}
    missing = [str(p) for e in encoders.values() for p in e.values() if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: not found (run `tec-pipeline demo --out {run}` first)")
    overrides, test_groups = with_demo_groups([*overrides, f"data.split={split}"])
    groups = scored_groups(load_finetune_config(CONFIG, overrides), test_groups)
    per_seed = []
    for seed in seeds:
        results = {name: finetune_one(path, out / f"seed{seed}" / name, seed, overrides)
                   for name, path in encoders[seed].items()}
        per_seed.append({"seed": seed, "top1": {n: r["top1"] for n, r in results.items()},
                         "margins": seed_margins(results, groups)})
    report = {"split": split, "seeds": per_seed, "summary": summary_lines(per_seed)}
    write_json(out / split_file("finetune", split), report, "the demo fine-tuning report")
    print("\n".join(report["summary"]))
    return report
