"""The splits a fine-tune trains and scores on: labelled ImageFolders or webdataset tars, or with
``data.split`` "val" the train split less the fifth held out for choosing a recipe (by whole groups
where ``data.groups`` names a groups file, `evaluate.groups`)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..data import open_source_at
from ..data.sources import ImageSource
from ..errors import UserError
from ..evaluate.features import class_labels, labelled_folder
from ..evaluate.groups import read_groups
from ..evaluate.protocols import validation_split
from .config import FinetuneConfig
from .data import LabelledImages, eval_transform, train_transform


def labelled_split(cfg: FinetuneConfig, path: str, classes: Optional[list] = None) -> tuple[ImageSource, np.ndarray, list]:
    """(source, labels, class names) of one split: an ImageFolder's class folders (`classes`: the train
    split's, so a val folder agrees), or webdataset tars whose .cls texts are class indices."""
    if cfg.data.kind == "imagefolder":
        source = labelled_folder(path)
        return source, class_labels(source, classes or source.classes), list(classes or source.classes)
    source = open_source_at("webdataset", path)
    labels = np.asarray(source.labels, dtype=np.int64)
    if len(labels) == 0 or labels.min() < 0:
        raise UserError(f"{path}: fine-tuning needs a .cls class index for every image"
                        + (f"; {source.name(int(np.argmin(labels)))} has none" if len(labels) else ", found no images"))
    classes = classes or [str(c) for c in range(int(labels.max()) + 1)]
    if labels.max() >= len(classes):
        raise UserError(f"{path}: class index {labels.max()} is beyond the train split's {len(classes)} classes")
    return source, labels, classes


def open_splits(cfg: FinetuneConfig) -> tuple[LabelledImages, LabelledImages, dict]:
    """The train and val splits with the train split's classes, and what identifies them. With
    ``data.split`` "val" both come from the train split: the fifth `held_out_split` holds out is
    scored on and never trained on, so a recipe chosen there never saw the test split."""
    train, labels, classes = labelled_split(cfg, cfg.data.train)
    present = np.unique(labels)
    if len(present) < 2:  # a one-class classifier scores 100% whatever its encoder
        raise UserError(f"data.train={cfg.data.train}: its images are of {len(present)} class "
                        f"({', '.join(classes[i] for i in present)}); fine-tuning and probing need at least two")
    if cfg.data.split == "val":
        fit, held = held_out_split(train, labels, cfg.data.groups)
        train_set = LabelledImages(train, labels, train_transform(cfg), cfg.seed, indices=fit)
        val_set = LabelledImages(train, labels, eval_transform(cfg), indices=held)
    else:
        val, val_labels, _ = labelled_split(cfg, cfg.data.val, classes)
        train_set = LabelledImages(train, labels, train_transform(cfg), cfg.seed)
        val_set = LabelledImages(val, val_labels, eval_transform(cfg))
    return train_set, val_set, {"split": cfg.data.split, "train_images": len(train_set), "val_images": len(val_set),
                                "classes": classes}


def held_out_split(train: ImageSource, labels: np.ndarray, groups: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) image indices of the train split: the fifth `demo --val` and `eval --val` score
    on (``evaluate.protocols.validation_split``), whole groups of the groups file `groups` (one row
    per image of `train`), or stratified by label where `groups` is empty."""
    return validation_split(labels, read_groups(groups, train) if groups else None)
