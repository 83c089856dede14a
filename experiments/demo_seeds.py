"""The default run over several seeds: is TEC's win over the base and the control a property
of the method, or of one seed's views, masks and initialisation?

Each seed is a whole demo run in its own folder (`out/seed<N>`); a finished one is read
back, so seeds can run in parallel processes and the summary be made afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from experiments.seeds_report import format_seed_summary, seed_summary
from tec_pipeline.stages.demo import run_demo
from tec_pipeline.demo.report import split_file
from tec_pipeline.errors import UserError
from tec_pipeline.files import write_json


def _report_or_run(out: Path, seed: int, overrides: Optional[list[str]], split: str) -> dict:
    """A finished seed's report is read back (seeds can run in parallel processes), else the demo runs.

    A report made with other overrides is refused: averaging it would mix two settings.
    """
    path = out / split_file("report", split)
    if not path.is_file():
        return run_demo(out, seed=seed, overrides=overrides, split=split)
    report, now = json.loads(path.read_text()), list(overrides or [])
    was = report.get("overrides", now)  # a report that records no overrides: not compared
    if was != now:
        raise UserError(f"{path} was made with overrides {was or 'none'}, this summary asks for {now or 'none'}; "
                        "give the same overrides or another --out")
    return report


def run_demo_seeds(seeds: list[int], out: str | Path = "runs/demo_seeds", overrides: Optional[list[str]] = None,
                   split: str = "test") -> dict:
    """The demo once per seed (views, masks, initialisation), then mean and spread per model."""
    out = Path(out)
    reports = [_report_or_run(out / f"seed{s}", s, overrides, split) for s in seeds]
    result = seed_summary(seeds, split, reports)
    write_json(out / split_file("seeds", split), result)
    print(format_seed_summary(result, reports))
    return result
