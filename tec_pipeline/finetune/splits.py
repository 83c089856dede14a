"""The splits a fine-tune trains and scores on: labelled ImageFolders or webdataset tars, or with
``data.split`` "val" the train split less the fifth held out for choosing a recipe (by whole groups
where ``data.groups`` names a groups file, `evaluate.groups`)."""
from __future__ import annotations

import numpy as np

from ..data.sources import ImageSource
from ..errors import UserError
from ..evaluate.features import labelled_split
from ..evaluate.groups import read_groups
from ..evaluate.protocols import validation_split
from .config import FinetuneConfig
from .data import LabelledImages, eval_transform, train_transform


def open_splits(cfg: FinetuneConfig) -> tuple[LabelledImages, LabelledImages, dict]:
    """The train and val splits with the train split's classes, and what identifies them. With
    ``data.split`` "val" both come from the train split: the fifth `held_out_split` holds out is
    scored on and never trained on, so a recipe chosen there never saw the test split."""
    train, labels, classes = labelled_split(cfg.data.kind, cfg.data.train, None, cfg.data.train, "fine-tuning")
    present = np.unique(labels)
    if len(present) < 2:  # a one-class classifier scores 100% whatever its encoder
        raise UserError(f"data.train={cfg.data.train}: its images are of {len(present)} class "
                        f"({', '.join(classes[i] for i in present)}); fine-tuning and probing need at least two")
    if cfg.data.split == "val":
        fit, held = held_out_split(train, labels, cfg.data.groups)
        train_set = LabelledImages(train, labels, train_transform(cfg), cfg.seed, indices=fit)
        val_set = LabelledImages(train, labels, eval_transform(cfg), indices=held)
    else:
        val, val_labels, _ = labelled_split(cfg.data.kind, cfg.data.val, classes, cfg.data.val, "fine-tuning")
        train_set = LabelledImages(train, labels, train_transform(cfg), cfg.seed)
        val_set = LabelledImages(val, val_labels, eval_transform(cfg))
    return train_set, val_set, {"split": cfg.data.split, "train_images": len(train_set), "val_images": len(val_set),
                                "classes": classes}


def held_out_split(train: ImageSource, labels: np.ndarray, groups: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) image indices of the train split: the fifth `demo --val` and `eval --val` score
    on (``evaluate.protocols.validation_split``), whole groups of the groups file `groups` (one row
    per image of `train`), or stratified by label where `groups` is empty."""
    return validation_split(labels, read_groups(groups, train) if groups else None)
