"""Several runs of one benchmark script merged into one result: what is deterministic (bytes,
errors) must agree, and each timing becomes the median of the runs with every run's value beside it."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable


def combine(paths: list[str], timings: tuple[str, ...], label: Callable[[dict], str]) -> dict:
    """The runs' JSON files (same rows in the same order) -> one result; `label` names a row in the
    message when a deterministic value differs between runs."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = runs[0]
    for i, row in enumerate(out["rows"]):
        same = [r["rows"][i] for r in runs]
        for key in list(row):
            values = [s[key] for s in same]
            if key in timings:
                row[key], row[key + "_runs"] = statistics.median(values), values
            elif any(v != values[0] for v in values):
                raise SystemExit(f"runs differ in {label(row)}: {key} {values}")
    out["info"]["runs"] = len(runs)
    return out
