"""The reuse study (`experiments.reuse`): each arm's settings give the reuse it is named for, at
equal steps from the same base on the same images; only the views differ."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.reuse import ARMS, BATCH, EPOCHS, IMAGES, arm_config, checked_arms, reuse_of
from tec_pipeline.errors import UserError
from tec_pipeline.train.reuse import view_reuse
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
    assert [reuse_of(ARMS[n]) for n in ("V1", "V3", "V8", "V24")] == [120, 40, 15, 5]
    # the same base, images, schedule and seed; no monitor; every cache and run its own folder
    assert len({(c.base.checkpoint, c.data.path, c.optim.epochs, c.data.batch_size, c.seed) for c in cfg.values()}) == 1
    assert not any(c.train.monitor.train or c.train.monitor.val for c in cfg.values())
    assert len({c.output for c in cfg.values()}) == len(cfg)
    assert cfg["V24"].cache.path != cfg["V24-grown"].cache.path


def test_the_grown_arm_runs_only_when_named():
    assert checked_arms(None) == ["fresh", "V1", "V3", "V8", "V24"]
    assert checked_arms(["V24-grown", "V24"]) == ["V24", "V24-grown"]
    with pytest.raises(UserError, match="unknown arm 'V2'"):
        checked_arms(["V2"])
