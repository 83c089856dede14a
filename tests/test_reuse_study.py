"""The reuse study (`experiments.reuse`): each arm's settings give the reuse it is named for, at
equal steps from the same base on the same images; only the views differ."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.reuse import ARMS, BATCH, EPOCHS, IMAGES, arm_config, checked_arms, reuse_of
from helpers import write_images
from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.demo.settings import demo_subset
from tec_pipeline.errors import UserError
from tec_pipeline.train.log import view_reuse
from tec_pipeline.train.schedule import make_schedule


def test_each_arm_reuses_its_views_as_named_at_equal_steps(tmp_path):
    images = Path("runs/reuse/images32")
    cfg = {name: arm_config(tmp_path, 1, name, images) for name in ARMS}
    steps = {name: make_schedule(c, IMAGES, 1, c.train.max_steps).total_steps for name, c in cfg.items()}
    assert set(steps.values()) == {EPOCHS * IMAGES // BATCH} == {120}  # equal steps, one batch per epoch
    for name, c in cfg.items():
        if ARMS[name].views is None:
            assert (c.targets.source, c.data.view_mode) == ("online", "fresh") and reuse_of(ARMS[name]) == 1
            continue
        assert c.targets.source == "cache" and c.data.views == ARMS[name].views
        assert view_reuse(steps[name], c.data.batch_size, IMAGES, c.data.views) == reuse_of(ARMS[name])
    assert [reuse_of(ARMS[n]) for n in ("V1", "V2", "V3", "V8", "V24")] == [120, 60, 40, 15, 5]
    # the same base, images, schedule and seed; no monitor; every cache and run its own folder
    assert len({(c.base.checkpoint, c.data.path, c.optim.epochs, c.data.batch_size, c.seed) for c in cfg.values()}) == 1
    assert not any(c.train.monitor.train or c.train.monitor.val for c in cfg.values())
    assert len({c.output for c in cfg.values()}) == len(cfg)
    assert cfg["V24"].cache.path != cfg["V24-grown"].cache.path


def test_the_grown_arm_runs_only_when_named():
    assert checked_arms(None) == ["fresh", "V1", "V2", "V3", "V8", "V24"]
    assert checked_arms(["V24-grown", "V24"]) == ["V24", "V24-grown"]
    with pytest.raises(UserError, match="unknown arm 'V4'"):
        checked_arms(["V4"])


def _margin(diff: float, half: float) -> dict:
    return {"diff": diff, "low": diff - half, "high": diff + half}


def test_a_cost_is_resolved_only_when_every_seed_loses_and_two_intervals_exclude_zero():
    from experiments.reuse_report import first_resolved, markdown_table

    def arm(reuse, knn, views):
        margins = [{"knn": _margin(d, h), "linear": _margin(0.0, 0.02)} for d, h in knn]
        spread = {"mean": 0.4, "std": 0.01, "values": [0.4, 0.41, 0.39]}
        return {"reuse": reuse, "views": views, "margins": margins, "knn": spread, "linear": spread,
                "wall_s": {"train": 60.0}, "cache_bytes": 1e6}

    fresh = {**arm(1, [], None), "margins": None, "cache_bytes": None}
    one_seed = arm(40, [(-0.03, 0.02), (0.01, 0.02), (-0.01, 0.02)], 3)  # one interval below 0, one seed gains
    two_seeds = arm(120, [(-0.03, 0.02), (-0.04, 0.02), (-0.01, 0.02)], 1)
    result = {"seeds": [0, 1, 2], "variants": {"fresh": fresh, "V3": one_seed, "V1": two_seeds}}
    assert first_resolved(result) == "120 (V1: k-NN)"
    result["variants"]["V1"] = arm(120, [(-0.03, 0.02), (0.0, 0.02), (-0.03, 0.02)], 1)
    assert first_resolved(result) == "none up to 120"
    table = markdown_table(result).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| fresh", "| V3", "| V1"]  # by reuse
    assert "**-3.0 (-5.0 to -1.0)**" in table[3] and "+1.0 (-1.0 to +3.0)" in table[3]


def test_the_subset_is_evenly_spaced_copied_once_and_remade_when_cut_short(tmp_path):
    """Files 0, 2, 5 and 7 of 10 in the class-sorted order; a finished copy is not made again (its
    source may even be gone); our own copy cut short (no done marker) is made again."""
    root = tmp_path / "demo"
    write_images(root / "train", 10, size=(8, 8), classes=2)
    every = ImageFolderSource(root / "train").files
    folder = demo_subset(root, tmp_path / "out", 4)
    assert ImageFolderSource(folder).files == [every[i] for i in (0, 2, 5, 7)]
    assert (folder / every[5]).read_bytes() == (root / "train" / every[5]).read_bytes()
    (folder / every[0]).unlink()
    assert demo_subset(tmp_path / "gone", tmp_path / "out", 4) == folder  # finished: kept as it is
    cut = tmp_path / "out" / "images3.tmp"
    write_images(cut / "c0", 1, size=(8, 8))  # a copy killed half-way: no images3/, no done marker
    remade = demo_subset(root, tmp_path / "out", 3)
    assert ImageFolderSource(remade).files == [every[i] for i in (0, 3, 6)] and not cut.exists()
