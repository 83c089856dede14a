"""The demo's base model: a small MAE trained by this pipeline on the demo digits.

`python -m experiments demo-base` writes `assets/demo_base/`, which the default run (`stages/demo.py`)
starts from: TEC learns from this base's targets, and the control continues this base's own
MAE objective.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from tec_pipeline.config import load_config
from tec_pipeline.demo.settings import BASE_CONFIG, BASE_DIR, demo_data_settings
from tec_pipeline.files import write_json
from tec_pipeline.stages.demo import run_train_and_export


def make_demo_base(out: str | Path = BASE_DIR, overrides: Optional[list[str]] = None) -> dict:
    """Train the demo's MAE base (`configs/demo_base.yaml`) and write what the demo starts from.

    `out/encoder.safetensors` is the base (a tec-pipeline export); `out/model.safetensors` holds
    the whole MAE model (encoder + decoder) so the control can continue its own objective;
    `out/base.json` records config, steps, final loss and wall time.
    """
    from safetensors.torch import save_file

    from tec_pipeline.config import to_dict
    from tec_pipeline.demo.data import build_demo_data
    from tec_pipeline.export import CHECKPOINT
    from tec_pipeline.train.checkpoint import load_checkpoint

    out = Path(out)
    cfg = load_config(BASE_CONFIG, list(overrides or []))
    start = time.perf_counter()
    build_demo_data(cfg.data.path, **demo_data_settings())
    summary, _ = run_train_and_export(cfg, out / "encoder.safetensors")
    state = load_checkpoint(Path(cfg.output) / CHECKPOINT)["model"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    record = {"command": "python -m experiments demo-base " + " ".join(overrides or []), "config": to_dict(cfg),
              "steps": summary["step"], "losses": summary["losses"], "wall_s": round(time.perf_counter() - start, 1)}
    write_json(out / "base.json", record)
    return record
