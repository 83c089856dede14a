"""Issue 33, the second round of bad input: a user's files are never touched, settings that
contradict each other are refused at load (`rules.RULES`, `finetune.config.RULES`), and every line
names the real cause. Each refusal: exit 2, one line, the settings or file named, and what is left
on disk checked."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, write_images
from test_faults import invoke, one_error_line as first_round_line


def one_error_line(result) -> str:
    """The first round's one-line check, and the line names a cause (not "unexpected ...")."""
    line = first_round_line(result)
    assert "unexpected" not in line, line
    return line


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (symlinks not followed into)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stage_one(url, images, *extra):
    return ["cache-targets", *TINY_BASE_ARGS, f"data.path={images}", "data.img_size=32", "data.views=2",
            "data.batch_size=6", "data.num_workers=0", "cache.images_per_shard=3", "cache.k_max=3",
            f"cache.path={url}", *extra]


def pixels_run(images, output, *extra):
    """`train` on pixels (MAE): no cache needed, a step in well under a second."""
    return ["train", *TINY_MODEL_ARGS, "targets.source=pixels", f"data.path={images}", "data.num_workers=0",
            f"output={output}", *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("round2") / "images", 8, size=(40, 40), classes=2)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Other images of the same two classes: the split a score is taken on."""
    return write_images(tmp_path_factory.mktemp("round2") / "held_out", 4, size=(40, 40), classes=2, seed=1)


# ----------------------------------------------------------------------------- a user's files are never touched
def test_a_users_zarr_store_with_cache_like_array_names_is_refused_not_cleaned(images, tmp_path):
    """Arrays named feat / attn / valid and a root zarr.json look like a cache's own files by name, but
    without tec_cache.json nothing proves cache-targets wrote them: refused, with or without --overwrite."""
    import zarr

    store = tmp_path / "mine.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    for name in ("feat", "attn", "valid"):
        group.create_array(name, shape=(4, 3), chunks=(2, 3), dtype="float32")[:] = np.arange(12).reshape(4, 3)
    before = digest(store)
    for extra in ([], ["--overwrite"]):
        line = one_error_line(invoke(*stage_one(store, images), *extra))
        assert line.startswith(f"error: {store} is not a tec-pipeline cache (it holds ") and "tec_cache.json" in line
        assert digest(store) == before


def test_a_folder_left_by_a_run_killed_before_its_metadata_is_still_used(images, tmp_path):
    """What a cache writes before its metadata (the lock, a half-written tec_cache.json) proves nothing
    of anyone else's: the folder is taken, the half-written file replaced."""
    url = tmp_path / "c.zarr"
    url.mkdir()
    (url / "tec_cache.lock").write_bytes(b"")
    (url / "tec_cache.json.tmp-0123abcd").write_text("{half")
    result = invoke(*stage_one(url, images))
    assert result.exit_code == 0, result.output
    assert not (url / "tec_cache.json.tmp-0123abcd").exists() and (url / "tec_cache.json").is_file()


def test_a_run_reached_through_a_symlink_into_a_cache_is_refused(tmp_path):
    cache = tmp_path / "c.zarr"
    (cache / "sub").mkdir(parents=True)
    (cache / "tec_cache.json").write_text("{}")
    (tmp_path / "link").symlink_to(cache / "sub")
    output = tmp_path / "link" / "run"
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, f"cache.path={cache}", f"output={output}"))
    assert f"output={output} is inside the target cache {cache}" in line
    assert sorted(p.name for p in cache.rglob("*")) == ["sub", "tec_cache.json"]


def test_a_cache_reached_through_a_symlink_into_a_run_is_refused(images, tmp_path):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "identity.json").write_text("{}")
    (tmp_path / "link").symlink_to(run / "sub")
    url = tmp_path / "link" / ".." / "c.zarr"  # the link's parent is the run, not tmp_path
    line = one_error_line(invoke(*stage_one(url, images)))
    assert f"cache.path={url} is inside the training run {run}" in line
    assert sorted(p.name for p in run.rglob("*")) == ["identity.json", "sub"]


# ----------------------------------------------------------------------------- settings that contradict each other
@pytest.mark.parametrize("overrides, named", [
    (["optim.warmup_epochs=5"], "optim.warmup_epochs=5, optim.epochs=1: the warmup must end before the run does"),
    (["model.mask_ratio=0.99"], "model.mask_ratio=0.99, data.img_size=32, model.arch.patch_size=8: masking keeps"),
    (["model.mask_ratio=0"], "model.mask_ratio=0.0: expected a value in (0, 1)"),
    (["optim.min_lr=10"], "optim.min_lr=10, optim.blr=0.05, data.batch_size=4, optim.accum_steps=1: need min_lr <= "
                          "the peak lr"),
    (["model.arch.embed_dim=33"], "model.arch.embed_dim=33, model.arch.num_heads=2: attention splits the width"),
    (["model.decoder_dim=33"], "model.decoder_dim=33, model.decoder_heads=2: attention splits the width"),
    (["model.adapter_group=2"], "model.encoder_adapter=true, targets.source=cache, model.arch.depth=3, "
                                "model.adapter_group=2: the encoder adapter groups consecutive blocks"),
    (["model.arch.patch_size=5"], "data.img_size=32, model.arch.patch_size=5: the image is cut into whole patches"),
    (["model.arch.img_size=64"], "model.arch.img_size=64, data.img_size=32: the new encoder is built at data.img_size"),
    (["data.view_mode=fresh"], "data.view_mode=fresh, targets.source=cache: a cache holds fixed views"),
    (["train.monitor.train=x"], "train.monitor.train=x, train.monitor.val=: the monitor fits on one labelled split"),
    (["cache.pq_subvectors=4"], "cache.pq_subvectors=4, cache.feat_dtype=float16: pq_subvectors is the code size"),
])
def test_contradicting_settings_stop_train_at_load_naming_each(tmp_path, overrides, named):
    output = tmp_path / "deep" / "run"
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, f"cache.path={tmp_path / 'none.zarr'}",
                                 f"output={output}", *overrides))
    assert line.startswith(f"error: {named}")
    assert list(tmp_path.iterdir()) == []  # before anything: no run folder, no cache looked for


@pytest.mark.parametrize("overrides, named", [
    (["data.scale_min=0.9", "data.scale_max=0.5"], "data.scale_min=0.9, data.scale_max=0.5: need scale_min <= "),
    (["base.arch.embed_dim=33"], "base.arch.embed_dim=33, base.arch.num_heads=2: attention splits the width"),
    (["base.arch.img_size=64"], "base.arch.img_size=64, data.img_size=32: the base runs at data.img_size"),
    (["targets.last_layers=3"], "targets.last_layers=3, base.arch.depth=2: the feature target averages"),
    (["cache.store_images=true"], "cache.store_images=true, cache.store=zarr: only webdataset samples keep"),
    (["cache.compress=lz4", "cache.store=webdataset"], "cache.compress=lz4, cache.store=webdataset: webdataset "
                                                       "members are zstd"),
])
def test_contradicting_settings_stop_cache_targets_before_the_cache_exists(images, tmp_path, overrides, named):
    url = tmp_path / "c.zarr"
    assert one_error_line(invoke(*stage_one(url, images, *overrides))).startswith(f"error: {named}")
    assert not url.exists()


def test_every_rule_names_settings_of_its_schema():
    """The tables are declared data: a rule over a misspelt key would never fire."""
    from tec_pipeline.config import DOMAINS
    from tec_pipeline.finetune import config as ft
    from tec_pipeline.rules import RULES

    for rules, domains in ((RULES, DOMAINS), (ft.RULES, ft.DOMAINS)):
        for rule in rules:
            assert len(rule.keys) >= 2 and all(key in domains or key == "protocol" for key in rule.keys), rule.keys


def test_the_masking_rule_is_the_models_own_count():
    """`rules.visible_patches` is what `random_masking` keeps, for every ratio the domain allows on a 4x4 grid."""
    from tec_pipeline.models.tec import random_masking
    from tec_pipeline.rules import masks_some_and_keeps_some, visible_patches

    x, noise = torch.zeros(1, 16, 2), torch.rand(1, 16)
    for ratio in np.linspace(0.01, 0.99, 99):
        kept = random_masking(x, float(ratio), noise)[0].shape[1]
        assert kept == visible_patches(float(ratio), 32, 8)
        assert masks_some_and_keeps_some(float(ratio), 32, 8) == (1 <= kept < 16)


def test_a_size_left_to_timms_default_is_checked_once_resolved(images, tmp_path):
    """embed_dim 40 against vit_tiny's own 3 heads: skipped at load (num_heads unset), refused once the
    default is known, naming both, before timm's assertion and before the run folder exists."""
    output = tmp_path / "run"
    line = one_error_line(invoke(*pixels_run(images, output, "model.arch.num_heads=null", "model.arch.embed_dim=40")))
    assert line.startswith("error: model.arch.embed_dim=40, model.arch.num_heads=3: attention splits the width")
    line = one_error_line(invoke(*pixels_run(images, output, "model.arch.name=vit_nope")))
    assert line.startswith("error: model.arch.name='vit_nope': not a timm ViT")
    assert not output.exists()


@pytest.mark.parametrize("source, arch", [("cache", "model.arch"), ("online", "base.arch")])
def test_resolved_sizes_are_refused_before_the_run_opens_its_data(tmp_path, source, arch):
    """The new encoder's sizes (online, the base's too) are held to the rules before the cache,
    the images or the base's checkpoint are opened: none of them exists here, and the line names
    the sizes."""
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, *TINY_BASE_ARGS, f"targets.source={source}",
                                 f"cache.path={tmp_path / 'no-cache'}", f"data.path={tmp_path / 'no-images'}",
                                 f"base.checkpoint={tmp_path / 'no-base.pth'}", f"output={tmp_path / 'run'}",
                                 f"{arch}.num_heads=null", f"{arch}.embed_dim=40"))
    assert line.startswith(f"error: {arch}.embed_dim=40, {arch}.num_heads=3: attention splits the width")
    assert not (tmp_path / "run").exists()


def test_a_min_lr_above_the_peak_counts_the_launchs_processes(monkeypatch):
    from tec_pipeline.config import ConfigError, load_config

    args = ["optim.blr=0.256", "data.batch_size=1", "optim.min_lr=0.002"]  # peak 0.001 x processes
    with pytest.raises(ConfigError, match=r"^optim.min_lr=0.002, optim.blr=0.256, data.batch_size=1"):
        load_config(None, args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config(None, args).optim.min_lr == 0.002


@pytest.mark.parametrize("overrides, named", [
    (["optim.epochs=5"], "optim.warmup_epochs=20, optim.epochs=5: the warmup must end before the run does"),
    (["optim.min_lr=1"], "optim.min_lr=1, optim.blr=0.001, data.batch_size=128, optim.accum_steps=1: need min_lr"),
    (["model.arch.embed_dim=100"], "model.arch.embed_dim=100, model.arch.num_heads=12: attention splits"),
    (["model.input_adapter=true"], "model.input_adapter=true, protocol=finetune: the input adapter is Tab. 4's"),
])
def test_contradicting_finetune_settings_stop_at_load(tmp_path, overrides, named):
    line = one_error_line(invoke("finetune", f"data.train={tmp_path}", f"data.val={tmp_path / 'val'}",
                                 "model.arch.num_heads=12", f"output={tmp_path / 'ft'}", *overrides))
    assert line.startswith(f"error: {named}")
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- lines that name the real cause
@pytest.fixture(scope="module")
def pixels_checkpoint(images, tmp_path_factory) -> Path:
    """A finished one-step MAE run of the tiny model (depth 3)."""
    run = tmp_path_factory.mktemp("pixels") / "run"
    result = invoke(*pixels_run(images, run, "train.max_steps=1"))
    assert result.exit_code == 0, result.output
    return run


def test_resuming_another_models_checkpoint_names_the_file(images, pixels_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((pixels_checkpoint / "checkpoint.pt").read_bytes())  # no identity.json
    before = digest(run)
    line = one_error_line(invoke(*pixels_run(images, run, "model.arch.depth=2", "model.adapter_group=1",
                                             "train.max_steps=1"), "--resume"))
    assert line.startswith(f"error: {run / 'checkpoint.pt'}: not a checkpoint of this run's model (")
    assert digest(run) == before


def test_a_killed_saves_leftover_goes_at_the_next_start_and_nothing_else_does(images, pixels_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "identity.json", "config.json"):
        (run / name).write_bytes((pixels_checkpoint / name).read_bytes())
    (run / "checkpoint.pt.tmp-0123abcd").write_bytes(b"half a checkpoint")
    (run / "checkpoint.pt.tmp-mine").write_bytes(b"a user's file")  # not the temporary name a save writes
    (run / "notes.tmp-89abcdef").write_bytes(b"neither")
    result = invoke(*pixels_run(images, run, "train.max_steps=1"), "--resume")
    assert result.exit_code == 0, result.output
    assert not (run / "checkpoint.pt.tmp-0123abcd").exists()
    assert (run / "checkpoint.pt.tmp-mine").read_bytes() == b"a user's file"
    assert (run / "notes.tmp-89abcdef").read_bytes() == b"neither"


def test_a_run_refused_after_its_config_loads_leaves_no_folder(images, tmp_path):
    output = tmp_path / "a" / "run"
    line = one_error_line(invoke(*pixels_run(images, output, f"model.init_checkpoint={tmp_path / 'missing.pt'}")))
    assert "model.init_checkpoint=" in line and "file not found" in line
    assert list(tmp_path.iterdir()) == []


def test_finetunes_resolved_sizes_are_refused_before_the_splits_are_listed(tmp_path):
    """As in stage two: the sizes timm fills in are held to the rules before the image folders are
    opened (neither exists here), and the line names the sizes."""
    line = one_error_line(invoke("finetune", f"data.train={tmp_path / 'no-train'}", f"data.val={tmp_path / 'no-val'}",
                                 "model.arch.num_heads=null", "model.arch.embed_dim=40", f"output={tmp_path / 'ft'}"))
    assert line.startswith("error: model.arch.embed_dim=40, model.arch.num_heads=12: attention splits the width")
    assert not (tmp_path / "ft").exists()


def test_linprobe_takes_a_training_runs_architecture_from_its_checkpoint(images, held_out, pixels_checkpoint, tmp_path,
                                                                       monkeypatch):
    """A run's checkpoint.pt records its model (patch 8, width 32): model.arch (timm's patch 16 default)
    is not consulted, as for an export. The file (about 3x its weights) is read once, and the weights
    read are not held once the classifier has them."""
    import gc
    import weakref

    from tec_pipeline.models import checkpoints
    from tec_pipeline.stages import finetune

    reads, torch_load = [], checkpoints.torch_load
    monkeypatch.setattr(checkpoints, "torch_load", lambda path: reads.append(path) or torch_load(path))
    read, held, read_encoder, train = [], [], finetune.read_encoder, finetune.train_classifier

    def reading(*args):
        encoder = read_encoder(*args)
        read.append(weakref.ref(next(iter(encoder.state.values()))))
        return encoder

    def training(*args):
        gc.collect()
        held.append(read[0]() is not None)
        return train(*args)

    monkeypatch.setattr(finetune, "read_encoder", reading)
    monkeypatch.setattr(finetune, "train_classifier", training)
    result = invoke("linprobe", f"model.checkpoint={pixels_checkpoint / 'checkpoint.pt'}", f"data.train={images}",
                    f"data.val={held_out}", "data.img_size=32", "data.batch_size=4", "data.num_workers=0",
                    "optim.epochs=1", "optim.warmup_epochs=0", f"output={tmp_path / 'lp'}")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lp" / "result.json").is_file()
    assert reads == [pixels_checkpoint / "checkpoint.pt"] and held == [False]


def test_an_image_size_the_checkpoints_patch_does_not_divide_is_refused(images, held_out, pixels_checkpoint, tmp_path):
    """timm would silently drop the pixels past the last whole patch (30 px at patch 8: 6 of them)."""
    ckpt = pixels_checkpoint / "checkpoint.pt"
    line = one_error_line(invoke("finetune", f"model.checkpoint={ckpt}", f"data.train={images}", f"data.val={held_out}",
                                 "data.img_size=30", "data.batch_size=4", f"output={tmp_path / 'ft'}"))
    assert line == f"error: data.img_size=30: not divisible by the patch size 8 of model.checkpoint={ckpt}"
    assert not (tmp_path / "ft").exists()


def test_a_checkpoint_that_does_not_fit_model_arch_names_model_arch(images, held_out, tmp_path):
    from helpers import tiny_arch
    from tec_pipeline.models.base import build_vit

    weights = tmp_path / "vit.pth"
    torch.save({"model": build_vit(tiny_arch()).state_dict()}, weights)  # patch 8, no recorded architecture
    line = one_error_line(invoke("linprobe", f"model.checkpoint={weights}", f"data.train={images}",
                                 f"data.val={held_out}", "data.img_size=32", "model.arch.name=vit_tiny_patch16_224",
                                 "data.batch_size=4", f"output={tmp_path / 'lp'}"))
    assert line == f"error: {weights}: patch size 8 in the checkpoint, 16 in model.arch (resampling the patch " \
                   "kernel would change the base)"
    assert not (tmp_path / "lp").exists()


def test_eval_names_its_arch_flag(images, held_out, pixels_checkpoint):
    line = one_error_line(invoke("eval", "-m", f"x={pixels_checkpoint / 'checkpoint.pt'}", "--arch", "vit_nope",
                                 "--train-dir", images, "--test-dir", held_out))
    assert line.startswith("error: --arch vit_nope: cannot build this ViT (Unknown model")


# ----------------------------------------------------------------------------- inspect during a write
def test_a_shard_completed_while_inspect_lists_files_is_not_called_missing(images, tmp_path, monkeypatch):
    """The listing and the records are two reads: a shard a running cache-targets finishes between them
    must not show as "file missing" (its records are now read first; its data is durable before them)."""
    from tec_pipeline.cache import owned
    from tec_pipeline.cache.store import open_cache

    url = tmp_path / "c.zarr"
    assert invoke(*stage_one(url, images)).exit_code == 0
    doc_path, done = url / "tec_cache.json", url / "_done"
    import json

    doc = json.loads(doc_path.read_text())
    doc_path.write_text(json.dumps({**doc, "complete": False, "shards": {}}))
    shard2 = {p: p.read_bytes() for p in url.rglob("*") if p.is_file() and "/c/2" in str(p)}
    marker = done / "shard-00002.json"
    saved_marker = marker.read_bytes()
    for p in [*shard2, marker]:
        p.unlink()
    listing = owned._files

    def listing_then_finish(fs, root):  # shard 2 is written (data, then marker) right after the listing
        found = listing(fs, root)
        for p, data in shard2.items():
            p.write_bytes(data)
        marker.write_bytes(saved_marker)
        return found

    monkeypatch.setattr(owned, "_files", listing_then_finish)
    reader = open_cache(str(url))
    assert reader.damaged_shards() == {}


# ----------------------------------------------------------------------------- past the list: a careless user
def test_a_run_into_a_folder_of_someone_elses_files_is_refused(images, tmp_path):
    """Without identity.json (a run's first write) nothing in the folder is a run's: a run would
    overwrite a config.json or log.jsonl of the same name."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    before = digest(folder)
    line = one_error_line(invoke(*pixels_run(images, folder)))
    assert line == f"error: output={folder} holds config.json and no run (identity.json): a run writes config.json, " \
                   "log.jsonl and more there; choose a new or empty folder"
    assert digest(folder) == before


def test_a_run_inside_the_image_folder_it_reads_is_refused(images, tmp_path):
    """The image folder is scanned whole: a picture the run writes (monitor.png) would join the data
    as a class folder of its own. Checked on resolved paths, so a link into the folder counts too."""
    (tmp_path / "link").symlink_to(images)
    output = tmp_path / "link" / "run"
    before = digest(images)
    line = one_error_line(invoke(*pixels_run(images, output)))
    assert line.startswith(f"error: output={output} is inside data.path={images}, a folder read as images")
    assert digest(images) == before and sorted(p.name for p in images.iterdir()) == ["c0", "c1"]


def test_export_never_replaces_a_file_it_did_not_write(pixels_checkpoint, tmp_path):
    mine = tmp_path / "weights.safetensors"
    mine.write_bytes(b"a user's file")
    for fmt in ("timm", "mae"):
        line = one_error_line(invoke("export", pixels_checkpoint, "--out", mine, "--format", fmt))
        assert line.startswith(f"error: --out {mine}: an existing file that is not a tec-pipeline export")
    assert mine.read_bytes() == b"a user's file"
    assert one_error_line(invoke("export", pixels_checkpoint, "--out", tmp_path)).startswith(f"error: --out {tmp_path}: "
                                                                                             "a folder")
    out = tmp_path / "encoder.safetensors"  # an export of ours is replaced, at any path
    for _ in range(2):
        assert invoke("export", pixels_checkpoint, "--out", out).exit_code == 0
    for _ in range(2):  # and so is the run's own default file of either format
        assert invoke("export", pixels_checkpoint, "--format", "mae").exit_code == 0


def test_eval_never_replaces_a_file_it_did_not_write_and_names_what_it_was_given(images, held_out, pixels_checkpoint,
                                                                                  tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    ckpt = pixels_checkpoint / "checkpoint.pt"
    common = ["--train-dir", images, "--test-dir", held_out]
    line = one_error_line(invoke("eval", "-m", f"a={ckpt}", *common, "--out", notes))
    assert line.startswith(f"error: --out {notes}: an existing file that is not an eval report")
    assert notes.read_text() == '{"mine": 1}'
    line = one_error_line(invoke("eval", "-m", f"a={pixels_checkpoint}", *common))
    assert line == f"error: {pixels_checkpoint}: a folder, not a checkpoint file (a run keeps its own in checkpoint.pt)"
    line = one_error_line(invoke("eval", "-m", f"a={ckpt}", *common, "--img-size", "31"))
    assert line == "error: --img-size 31: not divisible by the patch size 8 of --model a"


def test_a_score_on_the_images_it_fits_on_is_refused(images, pixels_checkpoint, tmp_path):
    """k-NN finds each image itself, a classifier scores its own training set: numbers that say nothing.
    Refused in eval, in fine-tuning (split test) and in the monitor, before anything is written."""
    ckpt = pixels_checkpoint / "checkpoint.pt"
    line = one_error_line(invoke("eval", "-m", f"a={ckpt}", "--train-dir", images, "--test-dir",
                                 tmp_path / ".." / tmp_path.name / ".." / images.parent.name / images.name))
    assert "is --train-dir: scored on the images it fits on" in line
    line = one_error_line(invoke("linprobe", f"model.checkpoint={ckpt}", f"data.train={images}", f"data.val={images}",
                                 f"output={tmp_path / 'lp'}"))
    assert line.startswith(f"error: data.train={images}, data.val={images}, data.split=test: scored on the images")
    line = one_error_line(invoke(*pixels_run(images, tmp_path / "run", f"train.monitor.train={images}",
                                             f"train.monitor.val={images}")))
    assert line.startswith(f"error: train.monitor.train={images}, train.monitor.val={images}: scored on the images")
    assert list(tmp_path.iterdir()) == []


def test_the_demo_never_overwrites_a_folder_of_the_users_files(tmp_path):
    """`demo --out` into a folder with files the demo does not write, or with the demo's file
    names but no demo run beside them, is refused before anything is written; an empty folder, a
    folder of an earlier demo run and a killed write's leftover are the demo's own."""
    from tec_pipeline.stages.demo import check_demo_folder, run_demo
    from tec_pipeline.errors import UserError

    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    before = digest(users)
    with pytest.raises(UserError, match=r"mine: holds 'notes.txt'; the demo .* would overwrite what is not its own"):
        run_demo(users)
    assert digest(users) == before
    only_report = tmp_path / "report_only"
    only_report.mkdir()
    (only_report / "report.json").write_text("{}")
    with pytest.raises(UserError, match="holds 'report.json' but no demo run"):
        check_demo_folder(only_report)
    earlier = tmp_path / "earlier"
    (earlier / "tec").mkdir(parents=True)
    (earlier / "tec" / "identity.json").write_text("{}")
    for name in ("report.json", "attention.png", "report.json.tmp-0a1b2c3d"):
        (earlier / name).write_text("")
    (tmp_path / "empty").mkdir()
    for fine in (tmp_path / "new", tmp_path / "empty", earlier):
        check_demo_folder(fine)
