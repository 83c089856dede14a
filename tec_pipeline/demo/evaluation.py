"""The demo's evaluation: models scored on the demo digits as the default run scores them.

`evaluate_on_demo` is `evaluate.report.run_eval` with the demo's pooling, grouped by the demo
build's groups files; `stages/demo.py` and the studies under `experiments/` score with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np

# Mean of patch tokens: the MAE base never trains its cls token, so cls pooling would favour TEC.
EVAL_POOL = "mean"


def evaluate_on_demo(models: list[tuple], root: Path, output: Path, seed: int, split: str,
                     floors: bool = True, probe_C: Optional[float] = None) -> tuple[list[dict], np.ndarray]:
    """`run_eval` of `models` (after the pixel and random-init floors, with `floors`) on the
    demo build `root`, grouped by its groups files (`tec_pipeline.demo.data.group_files`): the
    probe's held-out fifth and the val split hold out whole source digits, as the test split
    does; `probe_C` fixes the linear probe's C (None: chosen on the held-out fifth).
    (rows, the source digit of each scored image, for the margins' bootstrap)."""
    from ..evaluate.features import labelled_folder
    from ..evaluate.groups import read_groups
    from ..evaluate.report import run_eval, scored_groups
    from .data import group_files

    files = group_files(root)
    train, test = labelled_folder(root / "train"), labelled_folder(root / "test")
    train_groups = read_groups(files["train"], train)
    rows = run_eval(models, root / "train", root / "test", pool=EVAL_POOL, output=output, seed=seed,
                    echo=lambda *a: None, split=split, train_groups=train_groups, floors=floors, probe_C=probe_C)
    return rows, scored_groups(split, train.labels, train_groups, read_groups(files["test"], test))
