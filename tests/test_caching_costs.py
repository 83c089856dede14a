"""The caching-costs study (`experiments.caching_costs`): each variant's settings, and the table
made from finished rows read back."""
from __future__ import annotations

import json

import pytest

from experiments.caching_costs import VARIANTS, checked_names, run_caching_costs, variant_config
from tec_pipeline.errors import UserError


def test_each_variant_changes_only_its_setting(tmp_path):
    cfg = {name: variant_config(tmp_path, 3, name) for name in VARIANTS if name != "base"}
    assert cfg["tec-fresh"].targets.source == "online" and cfg["tec-fresh"].data.view_mode == "fresh"
    assert [cfg[f"tec-V{v}"].data.views for v in (1, 2, 4, 6)] == [1, 2, 4, 6]
    assert {c.targets.source for n, c in cfg.items() if n.startswith("tec-V")} == {"cache"}
    assert (cfg["tec-V2-int8"].cache.feat_dtype, cfg["tec-V2-int8"].cache.attn_dtype) == ("int8", "uint8")
    assert cfg["tec-V2-float32"].cache.feat_dtype == "float32" and cfg["tec-V2"].cache.feat_dtype == "float16"
    # Same views, another storage dtype: another cache; every run its own folder; one seed.
    caches = [cfg[n].cache.path for n in ("tec-V2", "tec-V2-float32", "tec-V2-int8", "tec-V4")]
    assert len(set(caches)) == 4
    assert len({c.output for c in cfg.values()}) == len(cfg) and {c.seed for c in cfg.values()} == {3}
    assert cfg["control-fresh"].targets.source == "pixels" and cfg["control-fresh"].data.view_mode == "fresh"
    assert cfg["control-V2"].data.views == 2 and cfg["control-V2"].data.view_mode == "cycle"
    # The control stops after TEC's steps (6 epochs x 78 batches of 64 of the 5,000 digits), as in the demo.
    assert cfg["control-V2"].train.max_steps == cfg["control-fresh"].train.max_steps == 6 * (5000 // 64)
    assert cfg["tec-V2"].train.max_steps is None
    # The schedules are the demo's: TEC variants differ from tec-V2 only in their own keys.
    assert {c.optim.epochs for n, c in cfg.items() if n.startswith("tec")} == {cfg["tec-V2"].optim.epochs}


def test_only_runs_the_named_variants_and_refuses_unknown_ones():
    assert checked_names(["tec-V4", "tec-fresh"]) == ["tec-fresh", "tec-V4"]
    assert checked_names(None) == list(VARIANTS)
    with pytest.raises(UserError, match="unknown variant 'tec-V3'"):
        checked_names(["tec-V3"])


def _row(path, knn_hits: str, linear_hits: str, groups, train_s: float, overrides=None):
    path.mkdir(parents=True)
    row = {"knn": knn_hits.count("1") / len(knn_hits), "linear": linear_hits.count("1") / len(linear_hits),
           "hits": {"knn": knn_hits, "linear": linear_hits}, "groups": groups,
           "wall_s": {"train": train_s, "eval": 1.0}, "cache_bytes": None, "views": 2,
           "overrides": list(VARIANTS[path.name].overrides) if overrides is None else overrides}
    (path / "row.json").write_text(json.dumps(row))


def test_finished_rows_are_read_back_and_compared_with_their_reference(tmp_path, capsys):
    groups = list(range(40))
    for seed, shift in ((0, 0), (1, 2)):
        _row(tmp_path / f"seed{seed}" / "tec-fresh", "1" * 20 + "0" * 20, "1" * 10 + "0" * 30, groups, 100.0 + seed)
        _row(tmp_path / f"seed{seed}" / "tec-V1", "1" * (10 + shift) + "0" * (30 - shift), "1" * 10 + "0" * 30, groups, 50.0)
    result = run_caching_costs([0, 1], tmp_path, only=["tec-fresh", "tec-V1"])
    v1 = result["variants"]["tec-V1"]
    assert v1["knn"]["values"] == [0.25, 0.30] and v1["knn"]["mean"] == pytest.approx(0.275)
    assert [m["knn"]["diff"] for m in v1["margins"]] == pytest.approx([-0.25, -0.20])
    assert v1["margins"][0]["knn"]["high"] < 0  # 10 of 40 digits lost and none gained: clearly below
    assert [m["linear"]["diff"] for m in v1["margins"]] == [0.0, 0.0]
    assert result["variants"]["tec-fresh"]["margins"] is None
    assert result["variants"]["tec-fresh"]["wall_s"]["train"] == pytest.approx(100.5)
    assert json.loads((tmp_path / "costs.json").read_text())["variants"]["tec-V1"]["knn"]["values"] == [0.25, 0.30]
    assert "tec-V1" in capsys.readouterr().out


def test_set_reaches_every_tec_variant_and_the_controls_steps_follow(tmp_path):
    longer = ["optim.epochs=12"]
    assert variant_config(tmp_path, 0, "tec-V1", longer).optim.epochs == 12
    assert variant_config(tmp_path, 0, "tec-fresh", longer).optim.epochs == 12
    control = variant_config(tmp_path, 0, "control-fresh", longer)
    assert control.train.max_steps == 12 * (5000 // 64) and control.optim.epochs == 40  # its own schedule, cut


def test_a_row_made_with_other_overrides_is_refused(tmp_path):
    _row(tmp_path / "seed0" / "tec-V1", "10", "10", [0, 1], 5.0)
    with pytest.raises(UserError, match="tec-V1/row.json was made with overrides.*give the same --set"):
        run_caching_costs([0], tmp_path, only=["tec-V1"], tec_overrides=["optim.epochs=12"])


def test_the_pq_variants_store_codes_against_the_int8_cache(tmp_path):
    cfg = {name: variant_config(tmp_path, 0, name) for name in ("tec-V2-int8", "tec-V2-pq32", "tec-V2-pq16")}
    assert [(c.cache.feat_dtype, c.cache.pq_subvectors, c.cache.attn_dtype) for c in cfg.values()] == [
        ("int8", None, "uint8"), ("pq", 32, "uint8"), ("pq", 16, "uint8")]
    assert len({c.cache.path for c in cfg.values()}) == 3  # a cache per codec setting
    assert VARIANTS["tec-V2-pq32"].reference == VARIANTS["tec-V2-pq16"].reference == "tec-V2-int8"


@pytest.mark.parametrize("name, m", [("tec-V2-pq32", 32), ("tec-V2-pq16", 16)])
def test_a_pq_variant_caches_and_trains_on_tiny_settings(tmp_path, name, m):
    from experiments.caching_costs import train_variant
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.demo.data import build_demo_data
    from tec_pipeline.demo.report import Timer

    build_demo_data(tmp_path / "demo", train_size=16, test_size=4)
    tiny = [f"data.path={tmp_path / 'demo'}", "train.max_steps=2", "data.batch_size=8", "data.num_workers=0",
            "cache.images_per_shard=8", "train.monitor.train=''", "train.monitor.val=''"]
    cfg = variant_config(tmp_path / "out", 0, name, tiny)
    _, facts = train_variant(cfg, Timer())
    reader = open_cache(cfg.cache.path)
    assert facts["steps"] == 2 and reader.read_shard(0)["feat"].shape == (8, 2, 64, 128)
    assert reader.open_shard(0).take([0], [1], 1)["feat"].shape == (1, 64, m)  # training reads the codes
    assert 0 < reader.summary["quantization"]["feat_rel_rms"] < 0.5
