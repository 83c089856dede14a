"""The default run's report: does TEC beat its base and the control, by more than the noise?

The demo (`stages/demo.py`) evaluates random-init, pixels, base, control and TEC the same way
(`evaluate.report`); this module reads those rows as the demo's question: the verdict (TEC
above both the base and the control in both protocols), TEC's margins with their 95%
intervals over the scored images, the wall time of every stage, and the scores TEC's run was
watched by while it trained (``train.monitor``). The evaluation itself knows nothing of these
model names.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import numpy as np

from ..evaluate.statistics import paired_difference

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


def monitor_summary(state: dict) -> dict:
    """TEC's watched run (``train.monitor``) from its checkpoint's monitor state: the base's scores,
    each point's, and the seconds the evaluations took (the base's once included)."""
    base, points = state.get("base") or {}, state["history"]
    seconds = sum(p["seconds"] for p in points) + base.get("seconds", 0.0)
    return {"base": {m: base[m] for m in METRICS if m in base}, "seconds": seconds,
            "points": [{k: p[k] for k in ("step", *METRICS) if k in p} for p in points]}


def format_monitor(summary: dict) -> str:
    """One line per monitored metric: top-1 by step, the base's, at how many points TEC is above it
    and from which step on it stays there."""
    lines = []
    for metric in sorted({m for p in summary["points"] for m in METRICS if m in p}, key=METRICS.index, reverse=True):
        points = [(p["step"], p[metric]) for p in summary["points"] if metric in p]
        base = summary["base"].get(metric)
        by_step = "  ".join(f"{step}: {100 * value:.1f}" for step, value in points)
        where = ""
        if base is not None:
            above = [value > base for _, value in points]
            first = next((i for i in range(len(above)) if all(above[i:])), None)
            since = f", from step {points[first][0]} on" if first is not None else ""
            where = f" (base {100 * base:.1f}; above it at {sum(above)} of {len(above)} points{since})"
        lines.append(f"monitor, {METRIC_NAMES[metric]} top-1 % by step  {by_step}{where}")
    lines.append(f"monitor: {len(summary['points'])} evaluations and the base's, {summary['seconds']:.0f} s of "
                 "train TEC's time; the picture: monitor.png")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """What one demo run prints: the table, the stage times, the verdict and TEC's margins, and the
    monitor's points where TEC's run was watched."""
    from ..evaluate.report import format_table  # imports torch; summaries read from reports need none

    parts = [format_table(report["rows"]), format_stages(report["wall_s"], report["cache_bytes"]),
             report["verdict"], format_margins(report["margins"])]
    if report.get("monitor"):
        parts.append(format_monitor(report["monitor"]))
    return "\n".join(parts)
