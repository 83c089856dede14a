"""`tec-pipeline ablate`: the Tab. 6 rows, one training run each, all from one stage-one cache.

A driver: each row's YAML becomes overrides (`tec_pipeline.train.ablations`), stage two trains
it (`tec_pipeline.stages.train.run_train`), and the final losses go into one table. With a
fine-tune config, each row is also exported and fine-tuned
(`tec_pipeline.stages.finetune.run_finetune`, Tab. 10) and the table is the paper's: row,
settings, top-1.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from tec_pipeline.stages.finetune import run_finetune
from tec_pipeline.stages.train import run_train
from tec_pipeline.config import Config, load_config, to_dict
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT, export_run
from tec_pipeline.files import write_json
from tec_pipeline.finetune.config import load_finetune_config
from tec_pipeline.finetune.state import RESULT_FILE
from tec_pipeline.train.ablations import ablation_title, format_finetune_rows, format_rows
from tec_pipeline.train.batches import TargetReader
from tec_pipeline.train.model import step_graph


def run_ablations(config_paths: Sequence[str | Path], cache: str | TargetReader, overrides: Sequence[str] = (),
                  base_config: Optional[str | Path] = None, output: str = "runs/ablations",
                  finetune: Optional[str | Path] = None, ft_overrides: Sequence[str] = ()) -> list[dict]:
    """Train one run per Tab. 6 YAML from the same cache and print their final losses as a table.

    Layers, last wins: `base_config` (or the defaults), the ablation YAML (a config file of its own, so an
    error names it), ``cache.path=<cache>``
    and ``targets.source=cache``, then `overrides`. Each run goes to ``<output>/<yaml stem>``
    and resumes there if it was interrupted (a finished one is only read back); a row whose settings
    equal an earlier row's is that row's result (``same_as``), not trained again. Rows train
    grouped by step graph (`training_order`); the table keeps the given order. A setting
    the cache cannot serve (e.g. k > k_max) makes that row "refused"; the others still run.
    `cache` is a cache path/URL or an already opened reader. With `finetune` (a fine-tune config,
    `ft_overrides` over it) each trained row is exported, fine-tuned into ``<row>/finetune`` and
    scored; the top-1 table also goes to ``<output>/finetune.json``.
    """
    missing = [str(p) for p in config_paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"ablation config not found: {missing[0]}")
    reader = None if isinstance(cache, (str, Path)) else cache
    layers = [*([f"cache.path={cache}"] if reader is None else []), "targets.source=cache", *overrides]
    rows, configs = load_rows(config_paths, base_config, layers, output)
    trained = {}  # a row's settings (less its output) -> that row's index
    for i in training_order(configs):
        cfg, key = configs[i], settings_key(configs[i])
        if key in trained:  # Tab. 6 repeats its reference in several panels (a1 = c3 = f1)
            continue
        try:
            summary = run_train(cfg, resume=Path(cfg.output, CHECKPOINT).exists(), reader=reader)
            rows[i].update(step=summary["step"], **summary["losses"])
            if finetune is not None:
                rows[i].update(finetune_row(Path(cfg.output), finetune, ft_overrides))
            trained[key] = i
        except UserError as err:
            rows[i].update(status=f"refused: {err}")
    for i, cfg in configs.items():
        same = trained.get(settings_key(cfg))
        if same is not None and same != i:
            rows[i] = {**rows[same], "name": rows[i]["name"], "title": rows[i]["title"], "same_as": rows[same]["name"]}
    print(format_rows(rows))
    if finetune is not None:
        print(format_finetune_rows(rows))
        write_json(Path(output) / "finetune.json", rows, "the fine-tuned ablation table")
    return rows


def load_rows(config_paths: Sequence[str | Path], base_config: Optional[str | Path], layers: Sequence[str],
              output: str) -> tuple[list[dict], dict[int, Config]]:
    """Each row's table entry and, where its YAML loads, its config (by row index) writing to
    ``<output>/<yaml stem>``; a row whose YAML is refused is marked so."""
    rows, configs = [], {}
    for i, path in enumerate(map(Path, config_paths)):
        rows.append({"name": path.stem, "title": ablation_title(path), "status": "done"})
        try:
            cfg = load_config(base_config, layers, extra_files=[path])
            configs[i] = replace(cfg, output=str(Path(output) / path.stem))
        except UserError as err:
            rows[i].update(status=f"refused: {err}")
    return rows, configs


def training_order(configs: dict[int, Config]) -> list[int]:
    """The rows in the order they train: grouped by step graph (`train.model.step_graph`), in the
    order each graph first appears, so a compiled step is built once per graph (Tab. 6's d1 and
    e1 train right after a4, whose graph they share); in table order within a graph."""
    graphs = list(dict.fromkeys(step_graph(cfg) for cfg in configs.values()))
    return sorted(configs, key=lambda i: (graphs.index(step_graph(configs[i])), i))


def settings_key(cfg) -> str:
    """What a row trains, as one string: every setting but where it is written. Rows with equal keys
    train the same model, so a sweep trains (and fine-tunes) it once."""
    return json.dumps({k: v for k, v in to_dict(cfg).items() if k != "output"}, sort_keys=True, default=str)


def finetune_row(row_dir: Path, finetune: str | Path, ft_overrides: Sequence[str]) -> dict:
    """A trained row's top-1 / top-5 after Tab. 10 fine-tuning of its export; a finished fine-tune
    (its result.json) is read back, an interrupted one resumed."""
    out, scores = row_dir / "finetune", ("top1", "top5", "best_top1")
    if (out / RESULT_FILE).is_file():
        done = json.loads((out / RESULT_FILE).read_text())
        if done["finished"]:
            return {k: done[k] for k in scores}
    encoder = export_run(row_dir)  # the same bytes for the same checkpoint: a resumed fine-tune's identity holds
    cfg = load_finetune_config(finetune, [*ft_overrides, f"model.checkpoint={encoder}", f"output={out}"])
    result = run_finetune(cfg, resume=(out / CHECKPOINT).exists())
    return {k: result[k] for k in scores}
