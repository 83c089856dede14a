"""The demo over several seeds, summarised (`experiments/demo_seeds.py`): each model's accuracy
as mean and spread over the seeds' reports, the seeds TEC won, and how many of TEC's margins
have a 95% interval clear of 0. Reads finished demo reports only; nothing here trains or scores.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tec_pipeline.demo.report import METRICS, format_margins


def tec_won(report: dict) -> bool:
    """Whether a demo report's verdict is a win in both metrics."""
    return report["verdict"].startswith("TEC beats")


def margin_list(reports: Sequence[dict]) -> list[dict]:
    """Every (seed, opponent, metric) margin of `reports`; a report without margins adds none."""
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
