"""The two frozen-feature protocols: weighted k-NN (DINO) and a logistic-regression probe.

k-NN needs no training and no hyperparameter search; the probe asks whether the classes are
linearly separable, with its regularization chosen per feature set on a held-out fifth of the
training set (`choose_probe_C`), never on the scored images.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the linear probe's inverse regularization, chosen per model
VAL_FRACTION = 0.2  # of the training set, held out to choose C


def knn_predict(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, k: int = 20, T: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Weighted k-NN (DINO): the k most cosine-similar training features vote for their class
    with weight exp(sim / T); the class with the largest total wins (ties: lowest index)."""
    train = F.normalize(torch.as_tensor(train_X, dtype=torch.float32), dim=1)  # (N_train, C)
    test = F.normalize(torch.as_tensor(test_X, dtype=torch.float32), dim=1)  # (N_test, C)
    labels = torch.as_tensor(train_y, dtype=torch.int64)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk):  # bounded memory: (chunk, N_train) similarities
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)  # (chunk, k)
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
    standardized with the fitting set's statistics. float32 features keep the solver in float32
    (half the bytes of float64 per pass); an unconverged fit (past `max_iter`) is kept rather
    than failing the run."""
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
    out with seed 0, by whole groups when given (the source digits of a demo build), so a
    hyperparameter chosen on it never saw the test split, nor a group it is scored on."""
    return probe_split(y, groups, seed=0)


def choose_probe_C(train_X: np.ndarray, train_y: np.ndarray, groups: Optional[np.ndarray] = None,
                   Cs: Sequence[float] = PROBE_CS, max_iter: int = 1000, seed: int = 0) -> float:
    """The C of `Cs` whose probe, fitted on the training set less a held-out fifth, is most
    accurate on that fifth (ties: the smaller C).

    Each feature set gets its own regularization, as a swept learning rate in the linear
    protocols of MAE and DINO: the 3,072-dim pixel floor overfits as C grows while 128-dim
    encoder features want weak regularization, so one fixed C favours one side. With
    `groups` (e.g. the demo's source digit of each image) the held-out fifth shares no group
    with the rest, as the demo's test split shares no source digit with training; otherwise
    it is stratified by label. The test set is never looked at.
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
