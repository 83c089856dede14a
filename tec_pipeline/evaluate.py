"""Frozen-feature evaluation: weighted k-NN and a linear probe on a labelled ImageFolder.

The paper reports fine-tuning; on a CPU demo the cheaper frozen-feature protocols say
whether pre-training learned anything: weighted k-NN on cosine similarity (DINO's
protocol, k=20, T=0.07) and a logistic-regression probe on standardized features.
Every table carries two floors measured the same way, so a number is read against
what costs nothing: raw pixels and a randomly initialised encoder of the same
architecture. A tiny MAE can sit at the random-init floor (measured on the demo set), and
only the floors make that visible.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from .config import ViTArch
from .data.sources import ImageFolderSource
from .errors import UserError
from .files import write_json
from .views import normalize

Pool = Literal["cls", "mean"]
PIXELS = "pixels"
RANDOM = "random-init"
PIXEL_SIZE = 32  # raw-pixel floor resolution: the tiny-images baseline, bounded memory at 224 px
PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the linear probe's inverse regularization, chosen per model
VAL_FRACTION = 0.2  # of the training set, held out to choose C


class EvalError(UserError):
    """An evaluation that cannot run as asked (unlabelled folder, unknown pooling, ...)."""


# ---------------------------------------------------------------- images and features


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
    size = encoder.patch_embed.img_size
    size = size if isinstance(size, int) else size[0]
    if size is None:  # dynamic-size patch embed: no fixed input size
        raise EvalError("encoder has no fixed img_size; build it with one")
    return int(size)


@torch.inference_mode()
def pool_features(encoder: VisionTransformer, images: Tensor, pool: Pool) -> Tensor:
    """cls: the final-norm cls token; mean: the mean of the final-norm patch tokens."""
    tokens = encoder.forward_features(images)
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
    """The raw-pixel floor: ImageNet-normalized pixels at `size` x `size`, flattened."""
    source = labelled_folder(folder)
    y = class_labels(source, classes)
    feats = [normalize(batch).flatten(1) for batch in image_batches(source, size, batch_size)]
    return torch.cat(feats).numpy(), y


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


# ---------------------------------------------------------------- the two protocols


def knn_predict(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, k: int = 20, T: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Weighted k-NN (DINO): the k most cosine-similar training features vote for their class
    with weight exp(sim / T); the class with the largest total wins (ties: lowest index)."""
    train = F.normalize(torch.as_tensor(train_X, dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(test_X, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.int64)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk):  # bounded memory: (chunk, N_train) similarities
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, labels[idx], (sim / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy()


def knn_accuracy(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray,
                 k: int = 20, T: float = 0.07) -> float:
    """Top-1 accuracy of the weighted k-NN classifier."""
    num_classes = int(max(np.max(train_y), np.max(test_y)) + 1)
    return float(np.mean(knn_predict(train_X, train_y, test_X, k, T, num_classes) == np.asarray(test_y)))


def fit_probe(X: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000):
    """Multinomial logistic regression (scikit-learn, lbfgs: deterministic) on features
    standardized with the fitting set's statistics. float32 halves the solver's time; an
    unconverged fit (past `max_iter`) is kept rather than failing the run."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(X, dtype=np.float32), y)
    return probe


def probe_split(y: np.ndarray, groups: Optional[np.ndarray] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: a seeded fifth held out, by whole groups when `groups` is given,
    else stratified by label."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    if groups is not None:
        return next(GroupShuffleSplit(1, test_size=VAL_FRACTION, random_state=seed).split(y, y, groups))
    return next(StratifiedShuffleSplit(1, test_size=VAL_FRACTION, random_state=seed).split(y, y))


def validation_split(y: np.ndarray, groups: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) indices of a training set for `split` "val": the fifth `probe_split` holds
    out with seed 0, by whole source digits on a demo build, so a hyperparameter chosen on it
    never saw the test split, nor a source digit it is scored on."""
    return probe_split(y, groups, seed=0)


def choose_probe_C(train_X: np.ndarray, train_y: np.ndarray, groups: Optional[np.ndarray] = None,
                   Cs: Sequence[float] = PROBE_CS, max_iter: int = 1000, seed: int = 0) -> float:
    """The C of `Cs` whose probe, fitted on the training set less a held-out fifth, is most
    accurate on that fifth (ties: the smaller C).

    Each feature set gets its own regularization, as a swept learning rate in the linear
    protocols of MAE and DINO: the 3,072-dim pixel floor overfits as C grows while 128-dim
    encoder features want weak regularization, so one fixed C favours one side. With
    `groups` (the demo's source digit of each image) the held-out fifth shares no group with
    the rest, as the test split shares no source digit with training; otherwise it is
    stratified by label. The test set is never looked at.
    """
    X, y = np.asarray(train_X, dtype=np.float32), np.asarray(train_y)
    fit, val = probe_split(y, groups, seed)
    scores = [fit_probe(X[fit], y[fit], C, max_iter).score(X[val], y[val]) for C in Cs]
    return float(Cs[int(np.argmax(scores))])


def linear_probe_accuracy(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray,
                          C: float = 0.01, max_iter: int = 1000) -> float:
    """Top-1 accuracy of the probe (`fit_probe`) fitted on the whole training set with `C`."""
    probe = fit_probe(train_X, train_y, C, max_iter)
    return float(probe.score(np.asarray(test_X, dtype=np.float32), test_y))


def hit_string(pred: np.ndarray, y: np.ndarray) -> str:
    """'1' where a prediction is right, '0' where wrong, in the scored folder's order: compact
    in JSON, and what a paired comparison of two models on the same images needs."""
    return "".join("1" if ok else "0" for ok in np.asarray(pred) == np.asarray(y))


def paired_difference(hits_a: str, hits_b: str, groups: Optional[np.ndarray] = None, confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b, scored on the same images, with a percentile-bootstrap
    confidence interval (scipy.stats.bootstrap, paired resampling).

    With `groups` (the source digit of each scored image on the demo) whole groups are
    resampled: renderings of one handwritten digit are not independent test cases, and an
    image-level bootstrap would make the interval too narrow. This is the test-sampling noise
    of a margin only: a different training seed moves the margin too, which is what the
    demo's several seeds measure.
    """
    from scipy.stats import bootstrap

    if len(hits_a) != len(hits_b) or not hits_a or (groups is not None and len(groups) != len(hits_a)):
        raise EvalError(f"paired comparison needs hits on the same images, got {len(hits_a)} and {len(hits_b)}"
                        + ("" if groups is None else f" and {len(groups)} groups"))
    a = np.frombuffer(hits_a.encode(), np.uint8).astype(np.float64) - ord("0")
    b = np.frombuffer(hits_b.encode(), np.uint8).astype(np.float64) - ord("0")
    diff = float(a.mean() - b.mean())
    if np.array_equal(a, b):  # every resample gives 0; scipy would warn about the degenerate case
        return {"diff": diff, "low": diff, "high": diff}
    # Per resampling unit: the summed a - b and the number of images; the statistic is their ratio.
    if groups is None:
        units, counts = a - b, np.ones_like(a)
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        units, counts = np.bincount(inverse, weights=a - b), np.bincount(inverse).astype(np.float64)
    ci = bootstrap((units, counts), lambda d, c, axis: d.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                   n_resamples=resamples, batch=1000, confidence_level=confidence, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return {"diff": diff, "low": float(ci.low), "high": float(ci.high)}


def scored_groups(train_dir: str | Path, test_dir: Optional[str | Path], split: Split) -> Optional[np.ndarray]:
    """The source digit of each image `evaluate_models` scores on `split`, in its order; None
    for folders that are not a demo build."""
    from .data.demo import source_groups
    if split == "test":
        return source_groups(labelled_folder(test_dir))
    train = labelled_folder(train_dir)
    groups = source_groups(train)
    return None if groups is None else groups[validation_split(np.asarray(train.labels), groups)[1]]


# ---------------------------------------------------------------- tables


Model = Union[VisionTransformer, Literal["pixels"]]
Split = Literal["test", "val"]
SPLITS = ("test", "val")


def model_features(model: Model, folder: str | Path, pool: Pool, batch_size: int, device: str | torch.device,
                   classes: Sequence[str], pixel_size: int = PIXEL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of a labelled folder: the raw-pixel floor for "pixels", else frozen encoder features."""
    if isinstance(model, str):
        return pixel_features(folder, pixel_size, classes=classes)
    return extract_features(model, folder, pool, batch_size, device, classes)


def evaluate_models(models: Mapping[str, Model], train_dir: str | Path, test_dir: Optional[str | Path],
                    pool: Pool = "cls", k: int = 20, T: float = 0.07, batch_size: int = 128,
                    device: str | torch.device = "cpu", floors: bool = True, seed: int = 0,
                    pixel_size: int = PIXEL_SIZE, probe_C: Optional[float] = None, log=None,
                    split: Split = "test") -> list[dict]:
    """One row {name, knn, linear, probe_C, dim, hits} per model, floors first; `hits` holds
    each metric's `hit_string` over the scored images.

    With `floors`, "pixels" and "random-init" (same architecture as the first encoder,
    see `random_init_like`) are added unless already present. `probe_C` None chooses the
    probe's C per model (`choose_probe_C`, grouped by source digit on a demo build). `split`
    "val" fits on four fifths of `train_dir` and scores on the fifth `validation_split` holds
    out (`test_dir` is not read): the split to tune on. `log` (a print-like callable) hears
    which model is being evaluated.
    """
    from .data.demo import source_groups
    if split not in SPLITS:
        raise EvalError(f"split must be one of {SPLITS}, got '{split}'")
    if split == "test" and test_dir is None:
        raise EvalError("scoring on the test split needs a test folder")
    models = dict(models)
    if floors:
        encoders = [m for m in models.values() if not isinstance(m, str)]
        extra: dict[str, Model] = {}
        if PIXELS not in models:
            extra[PIXELS] = PIXELS
        if encoders and RANDOM not in models:
            extra[RANDOM] = random_init_like(encoders[0], seed)
        models = {**extra, **models}
    train_source = labelled_folder(train_dir)
    test_classes = labelled_folder(test_dir).classes if split == "test" else []
    classes = sorted(set(train_source.classes) | set(test_classes))
    groups = source_groups(train_source)
    unknown = [f"model '{n}': unknown model '{m}'" for n, m in models.items() if isinstance(m, str) and m != PIXELS]
    if unknown:
        raise EvalError(f"{unknown[0]} (an encoder or '{PIXELS}')")
    rows = []
    for name, model in models.items():
        if log is not None:
            log(f"evaluating {name}")
        Xtr, ytr = model_features(model, train_dir, pool, batch_size, device, classes, pixel_size)
        fit_groups = groups
        if split == "val":
            fit, val = validation_split(ytr, groups)
            (Xtr, ytr), (Xte, yte) = (Xtr[fit], ytr[fit]), (Xtr[val], ytr[val])
            fit_groups = None if groups is None else groups[fit]
        else:
            Xte, yte = model_features(model, test_dir, pool, batch_size, device, classes, pixel_size)
        # One held-out fifth for every model and every run (split seed 0), so that a model's
        # number does not move with the seed of the run that evaluates it.
        C = probe_C if probe_C is not None else choose_probe_C(Xtr, ytr, fit_groups)
        hits = {"knn": hit_string(knn_predict(Xtr, ytr, Xte, k, T, len(classes)), yte),
                "linear": hit_string(fit_probe(Xtr, ytr, C).predict(np.asarray(Xte, dtype=np.float32)), yte)}
        rows.append({"name": name, **{m: h.count("1") / len(h) for m, h in hits.items()}, "probe_C": C,
                     "dim": int(Xtr.shape[1]), "hits": hits})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: model, feature dim, k-NN and linear top-1 in percent, the probe's C."""
    width = max([len("model")] + [len(r["name"]) for r in rows])
    lines = [f"{'model':<{width}}  {'dim':>6}  {'k-NN':>6}  {'linear':>6}  {'C':>6}"]
    lines += [f"{r['name']:<{width}}  {r['dim']:>6}  {100 * r['knn']:>5.1f}%  {100 * r['linear']:>5.1f}%  "
              f"{r.get('probe_C', float('nan')):>6.0e}" for r in rows]
    return "\n".join(lines)


def _plain(arch) -> object:
    return asdict(arch) if is_dataclass(arch) else arch


def run_eval(models: Sequence[tuple[str, Optional[Union[ViTArch, str]], Optional[str | Path]]],
             train_dir: str | Path, test_dir: Optional[str | Path], pool: Pool = "cls", img_size: int | None = None,
             output: str | Path | None = None, k: int = 20, T: float = 0.07, batch_size: int = 128,
             device: str | torch.device = "cpu", floors: bool = True, seed: int = 0,
             pixel_size: int = PIXEL_SIZE, probe_C: Optional[float] = None, echo=print,
             split: Split = "test") -> list[dict]:
    """The `eval` command: load (name, arch, checkpoint) triples with `load_base_model`
    (arch None: recorded in an export; checkpoint None: random init), evaluate them with the
    floors on `split` (`evaluate_models`), print the table and write it with its settings as
    JSON to `output`."""
    from .models.base import load_base_model

    encoders = {name: load_base_model(arch, checkpoint, img_size) for name, arch, checkpoint in models}
    rows = evaluate_models(encoders, train_dir, test_dir, pool, k, T, batch_size, device, floors, seed,
                           pixel_size, probe_C, log=echo, split=split)
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
