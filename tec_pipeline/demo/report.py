"""The default run's report: does TEC beat its base and the control, by more than the noise?

The demo (`stages/demo.py`) evaluates random-init, pixels, base, control and TEC the same way
(`evaluate.report`); this module reads those rows as the README's question: the verdict (TEC
above both the base and the control in both protocols), TEC's margins with their 95%
intervals over the scored images, the wall time of every stage, and the summary over
several seeds. The evaluation itself knows nothing of these model names.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import numpy as np

from .evaluate.statistics import paired_difference

METRICS = ("knn", "linear")
METRIC_NAMES = {"knn": "k-NN", "linear": "linear"}
OPPONENTS = ("base", "control")  # what TEC must beat: its starting point, and that point trained longer


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


def split_file(stem: str, split: str) -> str:
    """`stem`.json for the test split, `stem`_val.json for the validation split beside it, so
    that tuning in a run folder never overwrites (or is read back as) a test result."""
    return f"{stem}.json" if split == "test" else f"{stem}_{split}.json"


def verdict(rows: Sequence[dict]) -> str:
    """Whether TEC beats both the base and the control, in k-NN and in linear-probe accuracy."""
    by = {r["name"]: r for r in rows}
    wins = {m: all(by["tec"][m] > by[o][m] for o in OPPONENTS) for m in METRICS}
    if all(wins.values()):
        return "TEC beats the base and the control in k-NN and linear-probe accuracy."
    lost = ", ".join(m for m, won in wins.items() if not won)
    return f"TEC does NOT beat both the base and the control in: {lost}."


def tec_won(report: dict) -> bool:
    """Whether a demo report's verdict is a win in both metrics."""
    return report["verdict"].startswith("TEC beats")


def margins(rows: Sequence[dict], groups: Optional[np.ndarray] = None) -> dict:
    """TEC's margin over the base and over the control per metric, with its 95% interval over
    the scored images, resampled by source digit when `groups` gives them (`paired_difference`):
    whether a win is larger than the evaluation set's own noise."""
    by = {r["name"]: r for r in rows}
    return {other: {m: paired_difference(by["tec"]["hits"][m], by[other]["hits"][m], groups)
                    for m in METRICS} for other in OPPONENTS}


def format_margins(found: dict) -> str:
    """One line per opponent: TEC's margin in points, with its 95% interval, per metric."""
    return "\n".join(f"TEC - {other:<8}" + "   ".join(
        f"{METRIC_NAMES[m]} {100 * d['diff']:+.1f} (95% CI {100 * d['low']:+.1f} to {100 * d['high']:+.1f})"
        for m, d in per.items()) for other, per in found.items())


def format_stages(stages: dict[str, float], cache_bytes: int) -> str:
    """Wall seconds per stage, their total, and the size of the target cache."""
    lines = [f"{'stage':<16}{'wall s':>9}"] + [f"{name:<16}{sec:>9.1f}" for name, sec in stages.items()]
    lines.append(f"{'total':<16}{sum(stages.values()):>9.1f}")
    lines.append(f"cache size: {cache_bytes / 1e6:.1f} MB")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """What one demo run prints: the table, the stage times, the verdict and TEC's margins."""
    from .evaluate.report import format_table  # imports torch; a seed summary read from reports needs none

    return "\n".join([format_table(report["rows"]), format_stages(report["wall_s"], report["cache_bytes"]),
                      report["verdict"], format_margins(report["margins"])])


# ---------------------------------------------------------------- several seeds


def margin_list(reports: Sequence[dict]) -> list[dict]:
    """Every (seed, opponent, metric) margin of `reports`; reports written before margins were
    recorded have none."""
    return [d for rep in reports for per in rep.get("margins", {}).values() for d in per.values()]


def spread(values: Sequence[float]) -> dict:
    """Mean, population std and the values themselves, over seeds."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": list(values)}


def seed_summary(seeds: Sequence[int], split: str, reports: Sequence[dict]) -> dict:
    """Mean, population std and values of each model's accuracies over the seeds' reports; the
    seeds TEC won; the margins whose 95% interval excludes 0; each seed's total wall time."""
    summary = {}
    for name in [r["name"] for r in reports[0]["rows"]]:
        rows = [next(r for r in rep["rows"] if r["name"] == name) for rep in reports]
        summary[name] = {m: spread([r[m] for r in rows]) for m in METRICS}
    found = margin_list(reports)
    return {"seeds": list(seeds), "split": split, "summary": summary,
            "tec_wins": f"{sum(tec_won(rep) for rep in reports)}/{len(seeds)}",
            "clear_margins": f"{sum(d['low'] > 0 for d in found)}/{len(found)}",
            "wall_s": [sum(rep["wall_s"].values()) for rep in reports]}


def format_seed_summary(result: dict, reports: Sequence[dict]) -> str:
    """Mean +- std per model and metric, the seeds TEC won, each seed's margins and how many
    of them are clear of 0."""
    lines = [f"{'model':<12}{'k-NN mean +- std':>20}{'linear mean +- std':>22}"]
    lines += [f"{name:<12}{m['knn']['mean']:>12.3f} +- {m['knn']['std']:.3f}{m['linear']['mean']:>14.3f} +- "
              f"{m['linear']['std']:.3f}" for name, m in result["summary"].items()]
    lines.append(f"TEC beats base and control in both metrics in {result['tec_wins']} seeds")
    lines += [f"seed {seed}:\n{format_margins(rep['margins'])}"
              for seed, rep in zip(result["seeds"], reports) if "margins" in rep]
    if margin_list(reports):
        lines.append(f"margins whose 95% interval over the scored images excludes 0: {result['clear_margins']}")
    return "\n".join(lines)
