"""The evaluation table: every model and both floors through both protocols, and the `eval` command.

One row per model, floors first, each with the per-image hits of both protocols so that two
rows can be compared image by image (`statistics.paired_difference`). `split` "val" scores
on a held-out fifth of the training folder instead of the test folder: the split to tune on.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import numpy as np
import torch

from ..config import ViTArch
from ..data.sources import ImageFolderSource
from ..files import write_json
from .errors import EvalError
from .features import PIXEL_SIZE, PIXELS, Model, Pool, labelled_folder, model_features, random_init_like
from .protocols import PROBE_CS, choose_probe_C, fit_probe, knn_predict, validation_split
from .statistics import hit_string

RANDOM = "random-init"
Split = Literal["test", "val"]
SPLITS = ("test", "val")
Features = Callable[[Union[str, Path]], tuple[np.ndarray, np.ndarray]]  # folder -> (X (N, C), y (N,))


def check_split(split: Split, test_dir: Optional[str | Path]) -> None:
    """A known split, and a test folder where the test split is scored."""
    if split not in SPLITS:
        raise EvalError(f"split must be one of {SPLITS}, got '{split}'")
    if split == "test" and test_dir is None:
        raise EvalError("scoring on the test split needs a test folder")


def with_floors(models: Mapping[str, Model], seed: int) -> dict[str, Model]:
    """`models` after the floors they lack: "pixels", and "random-init" (the first encoder's
    architecture, `random_init_like`) where there is an encoder."""
    encoders = [m for m in models.values() if not isinstance(m, str)]
    floors: dict[str, Model] = {}
    if PIXELS not in models:
        floors[PIXELS] = PIXELS
    if encoders and RANDOM not in models:
        floors[RANDOM] = random_init_like(encoders[0], seed)
    return {**floors, **models}


def check_models(models: Mapping[str, Model]) -> None:
    """Every model is an encoder or the pixel floor."""
    unknown = [f"model '{n}': unknown model '{m}'" for n, m in models.items() if isinstance(m, str) and m != PIXELS]
    if unknown:
        raise EvalError(f"{unknown[0]} (an encoder or '{PIXELS}')")


def checked_groups(groups: Optional[np.ndarray], train: ImageFolderSource) -> Optional[np.ndarray]:
    """`groups` as an array of one group per training image, in the folder's order (None: no grouping)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if len(groups) != len(train):
        raise EvalError(f"{train.root}: {len(groups)} groups given for its {len(train)} images")
    return groups


def evaluated_classes(train: ImageFolderSource, test_dir: Optional[str | Path]) -> list[str]:
    """The class-folder names both folders are labelled by, sorted: the training folder's, so a
    class the test folder lacks keeps its label; a test class the training folder lacks is refused."""
    test_classes = labelled_folder(test_dir).classes if test_dir is not None else []
    unseen = sorted(set(test_classes) - set(train.classes))
    if unseen:  # no image of such a class could ever be classified right: the score would be capped, silently
        raise EvalError(f"{test_dir}: class folders {unseen} never occur in the training folder {train.root}")
    return sorted(train.classes)


def fit_and_scored(features: Features, train_dir: str | Path, test_dir: Optional[str | Path], split: Split,
                   groups: Optional[np.ndarray]) -> tuple[tuple, Optional[np.ndarray], tuple]:
    """((X, y) to fit on, their groups, (X, y) to score): the training folder and the test
    folder, or for "val" four fifths of the training folder and the fifth `validation_split`
    holds out."""
    Xtr, ytr = features(train_dir)
    if split == "test":
        return (Xtr, ytr), groups, features(test_dir)
    fit, val = validation_split(ytr, groups)
    return (Xtr[fit], ytr[fit]), None if groups is None else groups[fit], (Xtr[val], ytr[val])


def score_features(fitted: tuple, groups: Optional[np.ndarray], scored: tuple, k: int, T: float,
                   num_classes: int, probe_C: Optional[float]) -> dict:
    """{knn, linear, probe_C, dim, hits} of one model: both protocols fitted on `fitted` (X, y),
    scored on `scored`; `probe_C` None chooses C on a held-out fifth of `fitted` (by `groups`)."""
    (Xtr, ytr), (Xte, yte) = fitted, scored
    # One held-out fifth for every model and every run (split seed 0), so that a model's
    # number does not move with the seed of the run that evaluates it.
    C = probe_C if probe_C is not None else choose_probe_C(Xtr, ytr, groups)
    hits = {"knn": hit_string(knn_predict(Xtr, ytr, Xte, k, T, num_classes), yte),
            "linear": hit_string(fit_probe(Xtr, ytr, C).predict(np.asarray(Xte, dtype=np.float32)), yte)}
    return {**{m: h.count("1") / len(h) for m, h in hits.items()}, "probe_C": C, "dim": int(Xtr.shape[1]),
            "hits": hits}


def evaluate_models(models: Mapping[str, Model], train_dir: str | Path, test_dir: Optional[str | Path],
                    pool: Pool = "cls", k: int = 20, T: float = 0.07, batch_size: int = 128,
                    device: str | torch.device = "cpu", floors: bool = True, seed: int = 0,
                    pixel_size: int = PIXEL_SIZE, probe_C: Optional[float] = None, log=None,
                    split: Split = "test", train_groups: Optional[np.ndarray] = None) -> list[dict]:
    """One row {name, knn, linear, probe_C, dim, hits} per model, floors first; `hits` holds
    each metric's `hit_string` over the scored images.

    With `floors`, "pixels" and "random-init" are added unless already present (`with_floors`).
    `probe_C` None chooses the probe's C per model (`choose_probe_C`). `split` "val" fits on
    four fifths of `train_dir` and scores on the fifth `validation_split` holds out (`test_dir`
    is not read). `train_groups` gives the group of each image of `train_dir`, in its order
    (`groups.read_groups`, e.g. the source digit of each image of a demo build): the probe's
    held-out fifth and the "val" fifth then hold out whole groups; None stratifies them by label. `log` (a print-like
    callable) hears which model is being evaluated.
    """
    check_split(split, test_dir)
    if k < 1:
        raise EvalError(f"--k {k}: the k-NN needs at least one neighbour")
    models = with_floors(models, seed) if floors else dict(models)
    train = labelled_folder(train_dir)
    classes = evaluated_classes(train, test_dir if split == "test" else None)
    groups = checked_groups(train_groups, train)
    check_models(models)
    rows = []
    for name, model in models.items():
        if log is not None:
            log(f"evaluating {name}")
        features = partial(model_features, model, pool=pool, batch_size=batch_size, device=device,
                           classes=classes, pixel_size=pixel_size)
        fitted, fit_groups, scored = fit_and_scored(features, train_dir, test_dir, split, groups)
        rows.append({"name": name, **score_features(fitted, fit_groups, scored, k, T, len(classes), probe_C)})
    return rows


def scored_groups(split: Split, train_labels: Sequence[int], train_groups: Optional[np.ndarray],
                  test_groups: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The group of each image `evaluate_models` scores on `split`, in its order: what
    `paired_difference` resamples. From the groups of the test images, or for "val" those of
    the training images (with their labels) that `validation_split` holds out; None where the
    scored images have none."""
    if split == "test":
        return None if test_groups is None else np.asarray(test_groups)
    if train_groups is None:
        return None
    train_groups = np.asarray(train_groups)
    return train_groups[validation_split(np.asarray(train_labels), train_groups)[1]]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: model, feature dim, k-NN and linear top-1 in percent, the probe's C."""
    width = max([len("model")] + [len(r["name"]) for r in rows])
    lines = [f"{'model':<{width}}  {'dim':>6}  {'k-NN':>6}  {'linear':>6}  {'C':>6}"]
    lines += [f"{r['name']:<{width}}  {r['dim']:>6}  {100 * r['knn']:>5.1f}%  {100 * r['linear']:>5.1f}%  "
              f"{r.get('probe_C', float('nan')):>6.0e}" for r in rows]
    return "\n".join(lines)


def _plain(arch) -> object:
    """An architecture as JSON can hold it."""
    return asdict(arch) if is_dataclass(arch) else arch


def check_output(output: Path) -> None:
    """Refuse an --out that would replace a file eval did not write: a folder, or an existing file
    that is not an eval report (a JSON mapping with its ``models`` and ``rows``)."""
    if output.is_dir():
        raise EvalError(f"--out {output}: a folder; give the JSON file to write")
    if not output.exists():
        return
    try:
        ours = {"models", "rows"} <= set(json.loads(output.read_text()))
    except (ValueError, UnicodeDecodeError, TypeError):  # not JSON, not text, not a mapping
        ours = False
    if not ours:
        raise EvalError(f"--out {output}: an existing file that is not an eval report; eval replaces only its "
                        f"own reports: choose another --out")


def run_eval(models: Sequence[tuple[str, Optional[Union[ViTArch, str]], Optional[str | Path]]],
             train_dir: str | Path, test_dir: Optional[str | Path], pool: Pool = "cls", img_size: int | None = None,
             output: str | Path | None = None, k: int = 20, T: float = 0.07, batch_size: int = 128,
             device: str | torch.device = "cpu", floors: bool = True, seed: int = 0,
             pixel_size: int = PIXEL_SIZE, probe_C: Optional[float] = None, echo=print,
             split: Split = "test", train_groups: Optional[np.ndarray] = None) -> list[dict]:
    """The `eval` command: load (name, arch, checkpoint) triples with `load_base_model`
    (arch None: recorded in an export; checkpoint None: random init), evaluate them with the
    floors on `split`, held out by `train_groups` where given (`evaluate_models`), print the
    table and write it with its settings as JSON to `output`."""
    from ..models.base import load_base_model

    if output is not None:
        check_output(Path(output))
    encoders = {name: load_base_model(arch, checkpoint, img_size, setting="--arch")
                for name, arch, checkpoint in models}
    for name, encoder in encoders.items():  # timm would drop the pixels past the last whole patch
        patch = encoder.patch_embed.patch_size[0]
        if encoder.patch_embed.img_size[0] % patch:
            raise EvalError(f"--img-size {img_size}: not divisible by the patch size {patch} of --model {name}")
    rows = evaluate_models(encoders, train_dir, test_dir, pool, k, T, batch_size, device, floors, seed,
                           pixel_size, probe_C, log=echo, split=split, train_groups=train_groups)
    echo(format_table(rows))
    if output is not None:
        report = {
            "split": split, "train_dir": str(train_dir), "test_dir": None if split == "val" else str(test_dir),
            "pool": pool, "k": k, "T": T,
            "img_size": img_size, "pixel_size": pixel_size, "probe_C": probe_C, "probe_Cs": list(PROBE_CS), "seed": seed,
            "models": [{"name": n, "arch": _plain(a), "checkpoint": None if c is None else str(c)}
                       for n, a, c in models],
            "rows": rows,
        }
        write_json(output, report)
    return rows
