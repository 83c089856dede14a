"""`tec-pipeline ablate`: the Tab. 6 rows, one training run each, all from one stage-one cache.

A driver: each row's YAML becomes overrides (`tec_pipeline.train.ablations`), stage two trains
it (`stages.train.run_train`), and the final losses go into one table.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from stages.train import run_train
from tec_pipeline.config import load_config
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.train.ablations import ablation_overrides, ablation_title, format_rows
from tec_pipeline.train.batches import TargetReader


def run_ablations(config_paths: Sequence[str | Path], cache: str | TargetReader, overrides: Sequence[str] = (),
                  base_config: Optional[str | Path] = None, output: str = "runs/ablations") -> list[dict]:
    """Train one run per Tab. 6 YAML from the same cache and print their final losses as a table.

    Layers, last wins: `base_config` (or the defaults), the ablation YAML, ``cache.path=<cache>``
    and ``targets.source=cache``, then `overrides`. Each run goes to ``<output>/<yaml stem>``
    and resumes there if it was interrupted (a finished one is only read back). A setting
    the cache cannot serve (e.g. k > k_max) makes that row "refused"; the others still run.
    `cache` is a cache path/URL or an already opened reader.
    """
    missing = [str(p) for p in config_paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"ablation config not found: {missing[0]}")
    reader = None if isinstance(cache, (str, Path)) else cache
    cache_override = [f"cache.path={cache}"] if reader is None else []
    rows = []
    for path in map(Path, config_paths):
        row = {"name": path.stem, "title": ablation_title(path), "status": "done"}
        try:
            cfg = load_config(base_config, [*ablation_overrides(path), *cache_override, "targets.source=cache",
                                            *overrides])
            cfg = replace(cfg, output=str(Path(output) / path.stem))
            summary = run_train(cfg, resume=Path(cfg.output, CHECKPOINT).exists(), reader=reader)
            row.update(step=summary["step"], **summary["losses"])
        except UserError as err:
            row.update(status=f"refused: {err}")
        rows.append(row)
    print(format_rows(rows))
    return rows
