"""The reuse study's table (`experiments.reuse`) as docs/demo.md shows it, and its verdict: the
smallest reuse at which a cost against fresh crops is resolved.

A cost is **resolved** at a reuse when, in k-NN or in the linear probe, the margin against fresh
crops is negative in every seed and its paired 95% interval lies below 0 in at least two of
them; a single seed's interval below 0 is what test-set noise gives about once in 40 margins.
"""
from __future__ import annotations

from tec_pipeline.demo.report import METRIC_NAMES, METRICS


def resolved_cost(margins: list[dict], metric: str) -> bool:
    """Negative in every seed, the interval below 0 in at least two."""
    return all(m[metric]["diff"] < 0 for m in margins) and sum(m[metric]["high"] < 0 for m in margins) >= 2


def first_resolved(result: dict) -> str:
    """The smallest reuse with a resolved cost (naming the metric), or "none up to R"."""
    arms = sorted(((v["reuse"], name) for name, v in result["variants"].items() if v["margins"]), key=lambda t: t[0])
    for reuse, name in arms:
        found = [METRIC_NAMES[m] for m in METRICS if resolved_cost(result["variants"][name]["margins"], m)]
        if found:
            return f"{reuse:g} ({name}: {', '.join(found)})"
    return f"none up to {max(r for r, _ in arms):g}"


def _cell(d: dict) -> str:
    bold = d["low"] > 0 or d["high"] < 0
    text = f"{100 * d['diff']:+.1f} ({100 * d['low']:+.1f} to {100 * d['high']:+.1f})"
    return f"**{text}**" if bold else text


def markdown_table(result: dict) -> str:
    """One row per arm: reuse, V, accuracies per seed (mean +- std), margins per seed against fresh
    (bold: the 95% interval excludes 0), median train and cache seconds, cache MB."""
    lines = ["| arm | reuse | V | k-NN, seeds " + " / ".join(map(str, result["seeds"])) + " (mean +- std) | linear (mean +- std) "
             "| k-NN margin per seed | linear margin per seed | train s (median) | cache s | cache MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in sorted(result["variants"].items(), key=lambda kv: kv[1]["reuse"]):
        acc = [" / ".join(f"{100 * x:.1f}" for x in v[m]["values"]) + f" ({100 * v[m]['mean']:.1f} +- {100 * v[m]['std']:.1f})"
               for m in METRICS]
        margins = ["; ".join(_cell(s[m]) for s in v["margins"]) if v["margins"] else "" for m in METRICS]
        cache = "" if v["cache_bytes"] is None else f"{v['cache_bytes'] / 1e6:.1f}"
        lines.append(f"| {name} | {v['reuse']:g} | {v['views'] or 'fresh'} | {acc[0]} | {acc[1]} | {margins[0]} | "
                     f"{margins[1]} | {v['wall_s'].get('train', 0):.0f} | "
                     f"{'' if 'cache' not in v['wall_s'] else round(v['wall_s']['cache'])} | {cache} |")
    return "\n".join(lines)
