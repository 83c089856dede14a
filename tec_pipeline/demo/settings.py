"""The demo's set-up: its configs, its shipped base, its data set, and the two runs it compares.

`stages/demo.py` (the default run) and the studies under `experiments/` start from these. The
configs and the shipped base are files of the checkout (`configs/`, `assets/demo_base/`), found
from this file: an editable install's `tec_pipeline/` is the checkout's; a wheel ships neither,
so the demo runs from a checkout.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..config import Config, load_config
from ..errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
BASE_CONFIG = REPO / "configs" / "demo_base.yaml"
BASE_DIR = REPO / "assets" / "demo_base"


def demo_configs(out: Path, seed: int, overrides: list[str], base_dir: Path = BASE_DIR,
                 control_overrides: Sequence[str] = ()) -> tuple[Config, Config]:
    """(TEC config, control config) of one demo run under `out`, the seed applied to both;
    `overrides` apply to TEC's, `control_overrides` to the control's."""
    base_ckpt = base_dir / "encoder.safetensors"
    if not base_ckpt.is_file():
        raise UserError(f"{base_ckpt}: the demo base model is missing; make it with `python -m experiments demo-base`")
    common = [f"seed={seed}"]
    tec = load_config(DEMO_CONFIG, [*common, f"output={out / 'tec'}", f"base.checkpoint={base_ckpt}",
                                    f"cache.path={out / 'cache.zarr'}", *overrides])
    control = load_config(BASE_CONFIG, [*common, f"output={out / 'control'}",
                                        f"model.init_checkpoint={base_dir / 'model.safetensors'}",
                                        f"data.path={tec.data.path}", *control_overrides])
    return tec, control


def demo_data_settings() -> dict:
    """The demo set: 5,000 train and 1,000 test digits at the default difficulty, data seed 0.

    Fixed on purpose: every demo seed and the shipped base see the same images.
    """
    return {"train_size": 5000, "test_size": 1000, "difficulty": 0.5, "seed": 0}


def demo_subset(data_root: Path, out: Path, count: int) -> Path:
    """`count` of the demo's training digits (``data_root/train``), evenly spaced in its class-sorted
    order, copied once to the ImageFolder ``out/images{count}``. The copy is made in our own
    temporary folder and renamed into place with its ``done`` marker, so one cut short is made again."""
    from ..data.sources import ImageFolderSource

    folder, tmp = out / f"images{count}", out / f"images{count}.tmp"
    if (folder / "done").is_file():
        return folder
    source = ImageFolderSource(data_root / "train")
    shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished copy
    for i in range(count):
        name = source.files[i * len(source) // count]
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / "train" / name, tmp / name)
    (tmp / "done").write_text("")
    tmp.rename(folder)  # complete, marker and all, in one step
    return folder
