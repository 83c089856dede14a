"""Frozen features of a labelled ImageFolder: an encoder's pooled tokens, or the raw-pixel floor.

Both are read the way the views of both stages are (ImageNet-normalized), so the two
protocols compare encoders and floors on equal terms. `random_init_like` makes the other
floor: the encoder's architecture with none of its training.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ..data import open_source_at
from ..data.sources import ImageFolderSource
from ..views import normalize
from .errors import EvalError

Pool = Literal["cls", "mean"]
PIXELS = "pixels"
PIXEL_SIZE = 32  # raw-pixel floor resolution: the tiny-images baseline, bounded memory at 224 px
Model = Union[VisionTransformer, Literal["pixels"]]


def labelled_folder(folder: str | Path) -> ImageFolderSource:
    """An ImageFolder whose every image sits in a class folder."""
    source = ImageFolderSource(folder)
    if any(label < 0 for label in source.labels):
        raise EvalError(f"{folder}: evaluation needs labelled images (root/<class>/image), found images at the top level")
    return source


def class_labels(source: ImageFolderSource, classes: Sequence[str] | None) -> np.ndarray:
    """Labels as positions in `classes` (by class-folder name), so that a train and a test
    folder agree even when one of them lacks a class."""
    if classes is None:
        classes = source.classes
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(source.classes) - set(index))
    if missing:
        raise EvalError(f"{source.root}: class folders {missing} are not among the evaluated classes")
    return np.asarray([index[source.classes[label]] for label in source.labels], dtype=np.int64)


def labelled_split(kind: str, path: str | Path, classes: Sequence[str] | None, name: str,
                   needs: str) -> tuple[object, np.ndarray, list]:
    """(source, labels, class names) of one labelled split: an ImageFolder's class folders
    (`classes`: the train split's, so a val split agrees), or webdataset tars whose .cls texts
    are class indices. `name` names the split in an error, `needs` says who needs the labels."""
    if kind == "imagefolder":
        source = labelled_folder(path)
        names = list(classes or source.classes)
        return source, class_labels(source, names), names
    source = open_source_at("webdataset", str(path))
    labels = np.asarray(source.labels, dtype=np.int64)
    if len(labels) == 0 or labels.min() < 0:
        raise EvalError(f"{name}: {needs} needs a .cls class index for every image"
                        + (f"; {source.name(int(np.argmin(labels)))} has none" if len(labels) else ", found no images"))
    names = list(classes or [str(c) for c in range(int(labels.max()) + 1)])
    if labels.max() >= len(names):
        raise EvalError(f"{name}: class index {labels.max()} is beyond the train split's {len(names)} classes")
    return source, labels, names


def image_batches(source: ImageFolderSource, size: int, batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, size, size) batches in source order; bicubic resize only where needed."""
    for start in range(0, len(source), batch_size):
        batch = []
        for i in range(start, min(start + batch_size, len(source))):
            im = source.load(i)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            batch.append(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1))
        yield torch.stack(batch)


def encoder_img_size(encoder: VisionTransformer) -> int:
    """The square input size the encoder was built for."""
    size = encoder.patch_embed.img_size
    size = size if isinstance(size, int) else size[0]
    if size is None:  # dynamic-size patch embed: no fixed input size
        raise EvalError("encoder has no fixed img_size; build it with one")
    return int(size)


@torch.inference_mode()
def pool_features(encoder: VisionTransformer, images: Tensor, pool: Pool) -> Tensor:
    """cls: the final-norm cls token; mean: the mean of the final-norm patch tokens. (B, C)."""
    tokens = encoder.forward_features(images)  # (B, prefix + L, C)
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, encoder.num_prefix_tokens:].mean(1)


def extract_features(encoder: VisionTransformer, folder: str | Path, pool: Pool = "cls", batch_size: int = 128,
                     device: str | torch.device = "cpu",
                     classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of every image of a labelled ImageFolder: (X float32 (N, C), y int64 (N,)).

    Images are resized to the encoder's img_size if needed and ImageNet-normalized, as the
    views of both stages are.
    """
    if pool not in ("cls", "mean"):
        raise EvalError(f"pool must be 'cls' or 'mean', got '{pool}'")
    source = labelled_folder(folder)
    y = class_labels(source, classes)
    encoder = encoder.eval().to(device)
    feats = [pool_features(encoder, normalize(batch.to(device)), pool).float().cpu()
             for batch in image_batches(source, encoder_img_size(encoder), batch_size)]
    return torch.cat(feats).numpy(), y


def pixel_features(folder: str | Path, size: int = PIXEL_SIZE, batch_size: int = 512,
                   classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel floor: ImageNet-normalized pixels at `size` x `size`, flattened: (N, 3 * size * size)."""
    source = labelled_folder(folder)
    y = class_labels(source, classes)
    feats = [normalize(batch).flatten(1) for batch in image_batches(source, size, batch_size)]
    return torch.cat(feats).numpy(), y


def model_features(model: Model, folder: str | Path, pool: Pool, batch_size: int, device: str | torch.device,
                   classes: Sequence[str], pixel_size: int = PIXEL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of a labelled folder: the raw-pixel floor for "pixels", else frozen encoder features."""
    if isinstance(model, str):
        return pixel_features(folder, pixel_size, classes=classes)
    return extract_features(model, folder, pool, batch_size, device, classes)


def random_init_like(encoder: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """The same architecture, freshly initialised (timm's ViT init), frozen: the floor that
    tells what pre-training added over its starting point's architecture alone."""
    fresh = copy.deepcopy(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Every parameterised layer (norms included) first, then timm's own ViT init on top.
        for module in fresh.modules():
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        fresh.init_weights()
    fresh.requires_grad_(False)
    return fresh.eval()
