"""Frozen-feature evaluation: does pre-training give features a simple classifier can read?

The paper reports fine-tuning; on a CPU demo the cheaper frozen-feature protocols say
whether pre-training learned anything: weighted k-NN on cosine similarity (DINO's
protocol, k=20, T=0.07) and a logistic-regression probe on standardized features.
Every table carries two floors measured the same way, so a number is read against
what costs nothing: raw pixels and a randomly initialised encoder of the same
architecture. A small pre-trained encoder can score no better than its random
initialisation, and only the floors make that visible.

``features`` turns a labelled ImageFolder into (X, y) for an encoder or a floor,
``protocols`` holds k-NN and the probe, ``statistics`` the paired comparison of two models
on the same images, ``groups`` reads which images belong together (held out and resampled
as a whole), ``report`` the table and the `eval` command.
"""
