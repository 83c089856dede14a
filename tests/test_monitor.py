"""The monitor (`train.monitor`): the new model scored against its base while it trains. Its k-NN is
`eval`'s, the base is scored once, processes share the work without changing the score, a resume
continues the history, the guard stops a run whose encoder turns random, bad folders are one line,
and watching a run changes nothing of its training."""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from helpers import TINY_BASE, build_memory_cache, run_as_ranks, write_images
from tec_pipeline.stages.train import run_train
from test_train import tiny_config
from tec_pipeline.config import Config, MonitorConfig, load_config
from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.errors import UserError
from tec_pipeline.evaluate.features import extract_features, random_init_like
from tec_pipeline.evaluate.report import evaluate_models
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.models.tec import encoder_state
from tec_pipeline.train.checkpoint import load_checkpoint
from tec_pipeline.models.base import load_base_model
from tec_pipeline.train import monitor as monitor_module
from tec_pipeline.train.data import open_data
from tec_pipeline.train.model import new_model
from tec_pipeline.train.monitor import Monitor, MonitorStop
from tec_pipeline.train.monitor import gathered_features

MONITORED = ("train", "val")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Training images with a base and its in-memory cache, and labelled monitor folders whose
    classes the run's starting encoder can read (`readable_folders`)."""
    root = tmp_path_factory.mktemp("monitor")
    images = write_images(root / "images", 16, classes=2, name="{i:03d}.png")
    torch.manual_seed(1)
    torch.save(load_base_model(TINY_BASE, None).state_dict(), root / "base.pth")
    base = load_base_model(TINY_BASE, root / "base.pth", img_size=32)
    cache = build_memory_cache(base, ImageFolderSource(images), 32, 2, seed=0, k_max=5, images_per_shard=4,
                               source_path=str(images))
    world = {"root": root, "images": images, "base": str(root / "base.pth"), "cache": cache}
    world.update(readable_folders(world, root / "labelled"))
    return world


def watched(world, out: Path, **monitor) -> Config:
    """test_train's tiny run (16 images, batch 4, 2 epochs: 8 steps), starting from the base's
    encoder, watched every 2 steps on the world's monitor folders (`monitor` overrides settings)."""
    cfg = tiny_config(world, out)
    cfg.model = replace(cfg.model, init_from_base=True)
    settings = {"train": str(world["train"]), "val": str(world["val"]), "every": 2, "batch_size": 16, **monitor}
    cfg.train = replace(cfg.train, monitor=MonitorConfig(**settings))
    return cfg


def readable_folders(world, root: Path) -> dict:
    """48 + 24 random images, labelled by which side of the median the run's starting encoder (as
    exported) puts them along its features' first principal direction: classes that encoder
    reads and a random one does not."""
    cfg = tiny_config(world, root / "unused")
    cfg.model = replace(cfg.model, init_from_base=True)
    model, _ = new_model(cfg, open_data(cfg, reader=world["cache"]))
    encoder = copy.deepcopy(model.encoder)
    encoder.load_state_dict(encoder_state(model))
    rng = np.random.default_rng(5)
    pictures = rng.integers(0, 256, (72, 32, 32, 3), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        (root / "all" / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / "all" / "x" / f"{i:03d}.png")
    X, _ = extract_features(encoder, root / "all", "mean")
    X = X - X.mean(0)
    along = X @ np.linalg.svd(X, full_matrices=False)[2][0]
    labels = (along > np.median(along)).astype(int)
    for i, picture in enumerate(pictures):
        folder = root / ("train" if i < 48 else "val") / f"c{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i:03d}.png")
    return {"train": root / "train", "val": root / "val"}


def monitor_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "monitor/seconds"} for r in records if "monitor/knn_top1" in r]


def some_encoder(seed: int = 3):
    """A tiny timm ViT of fixed random weights (the monitor scores any encoder alike)."""
    from helpers import tiny_arch
    from tec_pipeline.models.base import build_vit

    torch.manual_seed(seed)
    return build_vit(tiny_arch()).eval()


# ---------------------------------------------------------------- the score is eval's
def test_the_monitors_knn_and_probe_equal_evals_on_the_same_features(world, tmp_path):
    encoder = some_encoder()
    cfg = MonitorConfig(train=str(world["train"]), val=str(world["val"]), batch_size=16, protocol="linear")
    mon = Monitor(cfg, Accelerator(cpu=True), encoder, None, total_steps=8, steps_per_epoch=4)
    rows = evaluate_models({"m": encoder}, world["train"], world["val"], pool="mean", batch_size=16, floors=False)
    X, _ = extract_features(encoder, world["train"], "mean", 16)
    assert np.array_equal(gathered_features(encoder, mon.train, "mean", 16, mon.accelerator), X)
    scores = mon.scores(encoder, linear=True)
    assert scores == {"knn": rows[0]["knn"], "linear": rows[0]["linear"]}
    assert mon.probe_C == rows[0]["probe_C"]  # chosen by eval's rule, on the first features it met
    assert mon.scores(encoder, linear=False) == {"knn": rows[0]["knn"]}
    assert 0.3 < rows[0]["knn"] < 1.0  # a number that could have differed


def _score_as_a_rank(cfg: MonitorConfig, weights: Path, out: Path) -> None:
    encoder = some_encoder()
    encoder.load_state_dict(torch.load(weights))
    acc = Accelerator(cpu=True)
    mon = Monitor(cfg, acc, encoder, None, total_steps=8, steps_per_epoch=4)
    features = gathered_features(encoder, mon.val, cfg.pool, cfg.batch_size, acc)
    scores = mon.scores(encoder, linear=True)
    if acc.is_main_process:
        out.write_text(json.dumps({"processes": acc.num_processes, "scores": scores, "features": features.tolist(),
                                   "local": len(mon.val.images)}))


def test_two_processes_give_the_score_of_one(world, tmp_path):
    """23 train and 11 val images (odd: the blocks differ in size and are padded for the gather)."""
    cfg = MonitorConfig(train=str(world["train"]), val=str(world["val"]), batch_size=4, max_images=23,
                        protocol="linear")
    torch.save(some_encoder(7).state_dict(), tmp_path / "w.pth")
    found = {}
    for world_size in (1, 2):
        out = tmp_path / f"{world_size}.json"
        assert run_as_ranks(_score_as_a_rank, cfg, tmp_path / "w.pth", out, world=world_size) == [0] * world_size
        found[world_size] = json.loads(out.read_text())
    one, two = found[1], found[2]
    assert (one["processes"], two["processes"]) == (1, 2) and (one["local"], two["local"]) == (23, 11)
    assert two["scores"] == one["scores"]
    np.testing.assert_allclose(two["features"], one["features"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- a watched run
def test_the_base_is_scored_once_and_every_record_holds_it(world, tmp_path, monkeypatch):
    calls = []
    real = monitor_module.run_base  # the monitor's way to its base (the run's init loads it too)
    monkeypatch.setattr(monitor_module, "run_base", lambda *a: calls.append(a) or real(*a))
    out = tmp_path / "run"
    run_train(watched(world, out), reader=world["cache"])
    records = monitor_records(out)
    assert len(calls) == 1
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    base = records[0]["monitor/base_knn_top1"]
    assert all(r["monitor/base_knn_top1"] == base for r in records)
    assert all(r["monitor/knn_vs_base"] == pytest.approx(r["monitor/knn_top1"] - base) for r in records)
    with Image.open(out / "monitor.png") as im:
        assert im.format == "PNG" and im.width > 600  # two panels: the loss and the score
    state = load_checkpoint(out / CHECKPOINT)["monitor"]
    assert [p["step"] for p in state["history"]] == [0, 2, 4, 6, 8] and state["base"]["knn"] == base


def test_watching_changes_nothing_of_the_training(world, tmp_path):
    """Same weights, bit for bit, and the same losses with and without the monitor (its
    evaluations draw from no generator the training uses)."""
    plain, seen = tmp_path / "plain", tmp_path / "watched"
    run_train(watched(world, plain, train="", val=""), reader=world["cache"])
    run_train(watched(world, seen, protocol="linear"), reader=world["cache"])
    a, b = load_checkpoint(plain / CHECKPOINT), load_checkpoint(seen / CHECKPOINT)
    assert a["step"] == b["step"] == 8 and "monitor" not in a
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    losses = lambda out: [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())  # noqa: E731
                          if "loss" in r]
    assert losses(plain) == losses(seen) and len(losses(plain)) == 8


def test_a_resume_continues_the_history_exactly(world, tmp_path, monkeypatch):
    """Stopped at step 5 (its checkpoint holds the points of steps 0, 2, 4), then resumed: the
    points of the uninterrupted run, none repeated or missing, and the base not scored again."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(watched(world, whole), reader=world["cache"])
    calls = []
    real = monitor_module.run_base  # the monitor's way to its base (the run's init loads it too)
    monkeypatch.setattr(monitor_module, "run_base", lambda *a: calls.append(a) or real(*a))
    run_train(watched(world, parts), reader=world["cache"], stop_after=5)
    assert [r["step"] for r in monitor_records(parts)] == [0, 2, 4]
    run_train(watched(world, parts), resume=True, reader=world["cache"])
    assert monitor_records(parts) == monitor_records(whole)
    assert [r["step"] for r in monitor_records(parts)] == [0, 2, 4, 6, 8] and len(calls) == 1
    # another val set (a resumable change) starts a new history at the resume step
    out = tmp_path / "changed"
    run_train(watched(world, out), reader=world["cache"], stop_after=5)
    run_train(watched(world, out, max_images=20), resume=True, reader=world["cache"])
    state = load_checkpoint(out / CHECKPOINT)["monitor"]
    assert [p["step"] for p in state["history"]] == [5, 6, 8]


# ---------------------------------------------------------------- the guard
def test_the_guard_stops_a_run_whose_encoder_turns_random(world, tmp_path, monkeypatch, capsys):
    """At step 4 the encoder's weights are replaced by a fresh random init: its score falls from
    what the starting encoder reads to about chance, and the run stops there with a checkpoint."""
    from tec_pipeline.train import loop

    watch = loop.watch

    def turning_random(run, monitor, meter, log):
        if run.step == 4:
            encoder = run.accelerator.unwrap_model(run.model).encoder
            with torch.no_grad():
                encoder.load_state_dict(random_init_like(encoder, seed=3).state_dict())
        watch(run, monitor, meter, log)

    monkeypatch.setattr(loop, "watch", turning_random)
    out = tmp_path / "run"
    cfg = watched(world, out, drop_margin=0.2, stop_on_drop=True, below_base_after=None)
    with pytest.raises(MonitorStop, match=r"^train.monitor.stop_on_drop: k-NN top-1 \S+ at step 4 is \S+ points "
                                          r"below the best seen .*checkpoint .*checkpoint.pt written"):
        run_train(cfg, reader=world["cache"])
    records = monitor_records(out)
    assert [r["step"] for r in records] == [0, 2, 4] and "monitor/warning" in records[-1]
    assert records[0]["monitor/knn_top1"] >= 0.75 and records[-1]["monitor/knn_top1"] <= 0.6
    assert load_checkpoint(out / CHECKPOINT)["step"] == 4
    assert "warning: monitor: k-NN top-1" in capsys.readouterr().err


def test_the_guard_warns_below_the_base_late_in_the_run(world):
    """Below the base before half the run: no warning; after it: one; a drop below the best: one."""
    cfg = MonitorConfig(train=str(world["train"]), val=str(world["val"]), below_base_after=0.5, drop_margin=0.1)
    mon = Monitor(cfg, Accelerator(cpu=True), some_encoder(), None, total_steps=10, steps_per_epoch=5)
    mon.base_scores = {"knn": 0.6}
    for step, score, warned in [(0, 0.5, None), (4, 0.55, None), (6, 0.58, "below the base's 60.0% past 50%"),
                                (8, 0.7, None), (10, 0.58, "is 12.0 points below the best seen (70.0% at step 8")]:
        mon.history.append({"step": step, "knn": score})
        warning = mon.guard(mon.history[-1])
        assert warning is None if warned is None else warned in warning, (step, warning)


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize("case,message", [
    ("missing", r"^train.monitor.train=\S+nowhere: \S+nowhere: image folder not found$"),
    ("flat", r"^train.monitor.train=\S+flat: .*found images at the top level$"),
    ("unknown class", r"^train.monitor.val=\S+extra: .*class folders \['c9'\] are not among"),
    ("one split", r"^train.monitor.train=\S+, train.monitor.val=: the monitor fits on one labelled split and "
                  r"scores on the other: set both or neither$"),
    ("one class", r"^train.monitor.train=\S+single: its images are of one class"),
    ("unlabelled tar", r"^train.monitor.val=\S+nolabel.tar: the monitor needs a .cls class index for every image"),
])
def test_bad_monitor_folders_are_one_line_before_training(world, tmp_path, case, message):
    write_images(tmp_path / "flat", 4)
    write_images(tmp_path / "extra" / "c9", 2)
    write_images(tmp_path / "single" / "c0", 4)
    import tarfile

    with tarfile.open(tmp_path / "nolabel.tar", "w") as tf:
        tf.add(next((world["val"] / "c0").iterdir()), arcname="x.png")
    settings = {"missing": {"train": str(tmp_path / "nowhere")}, "flat": {"train": str(tmp_path / "flat")},
                "unknown class": {"val": str(tmp_path / "extra")}, "one split": {"val": ""},
                "one class": {"train": str(tmp_path / "single")},
                "unlabelled tar": {"kind": "webdataset", "val": str(tmp_path / "nolabel.tar")}}[case]
    out = tmp_path / "run"
    cfg = watched(world, out, **settings)
    if case == "unlabelled tar":  # a labelled tar of the train folder beside it
        from test_finetune import as_webdataset

        tar = as_webdataset(world["train"], tmp_path / "train.tar")
        cfg.train = replace(cfg.train, monitor=replace(cfg.train.monitor, train=str(tar)))
    with pytest.raises(UserError, match=message) as caught:
        run_train(cfg, reader=world["cache"])
    assert "\n" not in str(caught.value)
    assert not (out / "log.jsonl").exists() and not (out / CHECKPOINT).exists()  # stopped at set-up


def test_labelled_tars_score_as_the_same_images_in_folders(world, tmp_path):
    from test_finetune import as_webdataset

    tars = {s: str(as_webdataset(world[s], tmp_path / f"{s}.tar")) for s in MONITORED}
    encoder = some_encoder()
    acc = Accelerator(cpu=True)
    folders = Monitor(MonitorConfig(train=str(world["train"]), val=str(world["val"])), acc, encoder, None, 8, 4)
    tar = Monitor(MonitorConfig(kind="webdataset", **tars), acc, encoder, None, 8, 4)
    assert tar.scores(encoder, linear=False) == folders.scores(encoder, linear=False)


def test_the_monitor_settings_load_and_are_checked():
    cfg = load_config(None, ["train.monitor.train=a", "train.monitor.val=b", "train.monitor.protocol=linear",
                             "train.monitor.below_base_after=null"])
    assert cfg.train.monitor.protocol == "linear" and cfg.train.monitor.below_base_after is None
    with pytest.raises(UserError, match=r"^train.monitor.protocol=probe: expected one of knn, linear$"):
        load_config(None, ["train.monitor.protocol=probe"])
    with pytest.raises(UserError, match=r"^train.monitor.drop_margin=2.0: expected a value in \[0, 1\]$"):
        load_config(None, ["train.monitor.drop_margin=2"])


def test_the_monitor_reads_the_device_only_at_its_evaluations(world, tmp_path, monkeypatch):
    """test_step_speed's check with the monitor on: over 8 steps logged and watched every 4, our code
    reads tensors on the host only inside the end of steps 4 and 8 (and before the first step)."""
    from test_step_speed import reads_outside_records

    cfg = watched(world, tmp_path / "run", every=4)
    cfg.train = replace(cfg.train, log_every=4)
    with reads_outside_records(monkeypatch, (4, 8)) as (reads, outside):
        assert run_train(cfg, reader=world["cache"])["step"] == 8
    assert outside == [], outside
    assert any("monitor" in path for _, path, _ in reads), "the evaluations read their features: the counter saw none"


# ---------------------------------------------------------------- the demo's report and the picture
def test_the_demo_reports_when_tec_passes_its_base():
    from tec_pipeline.demo.report import format_monitor, format_report, margins, monitor_summary, verdict

    state = {"base": {"knn": 0.126, "linear": 0.298, "seconds": 20.0},
             "history": [{"step": 0, "epoch": 0.0, "knn": 0.119, "linear": 0.291, "seconds": 10.0},
                         {"step": 156, "epoch": 2.0, "knn": 0.140, "linear": 0.334, "seconds": 12.0},
                         {"step": 312, "epoch": 4.0, "knn": 0.122, "linear": 0.337, "seconds": 12.5}]}
    summary = monitor_summary(state)
    assert summary["seconds"] == 54.5 and summary["points"][1] == {"step": 156, "knn": 0.140, "linear": 0.334}
    lines = format_monitor(summary).splitlines()
    assert lines[0] == ("monitor, linear top-1 % by step  0: 29.1  156: 33.4  312: 33.7 "
                        "(base 29.8; above it at 2 of 3 points, from step 156 on)")
    assert lines[1].startswith("monitor, k-NN top-1 % by step  0: 11.9") and lines[1].endswith("at 1 of 3 points)")
    assert lines[2].startswith("monitor: 3 evaluations and the base's, 54 s")
    hits = {"knn": "1100", "linear": "1010"}
    table = [{"name": n, "knn": 0.5, "linear": 0.5, "probe_C": 0.01, "dim": 8, "hits": hits} for n in ("base", "control",
                                                                                                      "tec")]
    report = {"rows": table, "wall_s": {"eval": 2.0}, "cache_bytes": 1, "verdict": verdict(table),
              "margins": margins(table)}
    assert format_report({**report, "monitor": summary}).splitlines()[-3:] == lines
    assert len(format_report(report).splitlines()) == 11  # an unwatched run prints what it printed before


def test_the_monitor_picture_draws_loss_and_scores_from_a_log(tmp_path):
    from tec_pipeline.viz import plot_monitor

    records = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 9)]
    records += [{"step": s, "monitor/knn_top1": 0.5 + s / 100, "monitor/base_knn_top1": 0.52} for s in (0, 4, 8)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_monitor(tmp_path / "log.jsonl", tmp_path / "monitor.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (900, 320)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("monitor.png.tmp")] == []


def test_the_demo_watches_tec_on_its_own_digits_and_not_the_control(tmp_path):
    from tec_pipeline.demo.settings import demo_configs

    tec, control = demo_configs(tmp_path, 0, [])
    m = tec.train.monitor
    assert (Path(m.train), Path(m.val)) == (Path(tec.data.path) / "train", Path(tec.data.path) / "test")
    assert m.protocol == "linear" and m.max_images == 2000 and not control.train.monitor.train
    assert m.every_epochs == 2 and not m.stop_on_drop  # watching never stops the demo's run
