"""Two models scored on the same images: per-image hits, and whether their gap exceeds the noise.

A difference of two accuracies on one test set is itself a measurement with sampling
noise; `paired_difference` gives it an interval, pairing the two models image by image
(or group by group, where the images come in dependent groups).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import EvalError


def hit_string(pred: np.ndarray, y: np.ndarray) -> str:
    """'1' where a prediction is right, '0' where wrong, in the scored folder's order: compact
    in JSON, and what a paired comparison of two models on the same images needs."""
    return "".join("1" if ok else "0" for ok in np.asarray(pred) == np.asarray(y))


def hit_array(hits: str) -> np.ndarray:
    """A hit string as float64 0/1, one per scored image."""
    return np.frombuffer(hits.encode(), np.uint8).astype(np.float64) - ord("0")


def resampling_units(a_minus_b: np.ndarray, groups: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per resampling unit (an image, or a whole group when `groups` is given): the summed
    a - b and the number of images; the resampled statistic is the ratio of their sums."""
    if groups is None:
        return a_minus_b, np.ones_like(a_minus_b)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return np.bincount(inverse, weights=a_minus_b), np.bincount(inverse).astype(np.float64)


def paired_difference(hits_a: str, hits_b: str, groups: Optional[np.ndarray] = None, confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b, scored on the same images, with a percentile-bootstrap
    confidence interval (scipy.stats.bootstrap, paired resampling): {diff, low, high}.

    With `groups` (e.g. the source digit of each scored image on the demo) whole groups are
    resampled: renderings of one handwritten digit are not independent test cases, and an
    image-level bootstrap would make the interval too narrow. This is the test-sampling noise
    of a margin only: a different training seed moves the margin too, which is what the
    demo's several seeds measure.
    """
    from scipy.stats import bootstrap

    if len(hits_a) != len(hits_b) or not hits_a or (groups is not None and len(groups) != len(hits_a)):
        raise EvalError(f"paired comparison needs hits on the same images, got {len(hits_a)} and {len(hits_b)}"
                        + ("" if groups is None else f" and {len(groups)} groups"))
    a, b = hit_array(hits_a), hit_array(hits_b)
    diff = float(a.mean() - b.mean())
    if np.array_equal(a, b):  # every resample gives 0; scipy would warn about the degenerate case
        return {"diff": diff, "low": diff, "high": diff}
    units, counts = resampling_units(a - b, groups)
    ci = bootstrap((units, counts), lambda d, c, axis: d.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                   n_resamples=resamples, batch=1000, confidence_level=confidence, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return {"diff": diff, "low": float(ci.low), "high": float(ci.high)}
