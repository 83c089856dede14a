"""The table of what caching costs (`experiments/caching_costs.py`): each variant's accuracy over the
seeds, and its margin over its reference in each seed with the 95% interval over the scored
source digits (`evaluate.statistics.paired_difference`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from experiments.seeds_report import spread
from tec_pipeline.demo.report import METRICS
from tec_pipeline.evaluate.statistics import paired_difference


def margins_to_reference(rows: Mapping[str, dict], references: Mapping[str, str]) -> dict:
    """{variant: {metric: {diff, low, high}}}: each variant with a reference minus that
    reference, paired image by image and resampled by the scored images' groups."""
    found = {}
    for name, ref in references.items():
        groups = np.asarray(rows[name]["groups"])
        found[name] = {m: paired_difference(rows[name]["hits"][m], rows[ref]["hits"][m], groups) for m in METRICS}
    return found


def summarize_costs(seeds: Sequence[int], split: str, rows: Mapping[int, Mapping[str, dict]],
                    margins: Mapping[int, dict]) -> dict:
    """Per variant: accuracy mean and spread over `seeds`, its reference, median wall seconds
    per part and cache bytes; per seed: the margins over the reference."""
    names = list(rows[seeds[0]])
    variants = {}
    for name in names:
        per_seed = [rows[s][name] for s in seeds]
        walls = [r["wall_s"] for r in per_seed]
        variants[name] = {
            **{m: spread([r[m] for r in per_seed]) for m in METRICS},
            "overrides": per_seed[0].get("overrides", []),
            "wall_s": {part: float(np.median([w[part] for w in walls])) for part in walls[0]},
            "cache_bytes": per_seed[0].get("cache_bytes"), "views": per_seed[0].get("views"),
            "margins": [margins[s][name] for s in seeds] if name in margins[seeds[0]] else None,
        }
    return {"seeds": list(seeds), "split": split, "variants": variants}


def _margin_cell(d: dict) -> str:
    """A margin in points with its interval, bold-marked (*) where the interval excludes 0."""
    clear = "*" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{100 * d['diff']:+.1f}{clear} ({100 * d['low']:+.1f}..{100 * d['high']:+.1f})"


def format_costs(result: dict) -> str:
    """One line per variant: accuracies (mean +- std over the seeds), each seed's margins over
    the reference (* : the 95% interval excludes 0), median training seconds, cache MB."""
    lines = [f"{'variant':<16}{'k-NN':>14}{'linear':>14}  margins k-NN / linear per seed{'':>10}train s  cache MB"]
    for name, v in result["variants"].items():
        acc = "".join(f"{100 * v[m]['mean']:>8.1f} +- {100 * v[m]['std']:.1f}" for m in METRICS)
        margin = "  ".join(f"{_margin_cell(d['knn'])} / {_margin_cell(d['linear'])}" for d in v["margins"] or [])
        cache = "" if v["cache_bytes"] is None else f"{v['cache_bytes'] / 1e6:.0f}"
        train = v["wall_s"].get("train")
        lines.append(f"{name:<16}{acc}  {margin or '(reference)':<40}{'' if train is None else f'{train:.0f}':>8}  {cache:>8}")
    return "\n".join(lines)
