"""Stage two: data order and readers, schedule, resume, NaN stop, cached == online, pixels."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (TINY_BASE, MemoryCache, build_memory_cache, fill_to, run_as_ranks, small_filesystem, tiny_arch,
                     write_images)
from tec_pipeline.stages import train as train_stage
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.train import run_train
from tec_pipeline.config import Config, TrainConfig
from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.train.checkpoint import load_checkpoint
from tec_pipeline.models.base import load_base_model
from tec_pipeline.pixels import patchify, pixel_targets
from tec_pipeline.models.tec import TECModel
from tec_pipeline.train.batches import CachedBatches
from tec_pipeline.train.loader import epoch_order, first_sample, mask_noise, plan_epoch, uniform_shards, view_indices
from tec_pipeline.rules import scaled_lr
from tec_pipeline.train.schedule import lr_at, param_groups
from tec_pipeline.views import render_view, sample_view

BASE, NEW = TINY_BASE, tiny_arch()
N_IMAGES, VIEWS, K_MAX, PER_SHARD = 16, 2, 5, 4


def make_images(root: Path, n: int = N_IMAGES) -> Path:
    """Random RGB images of a few sizes (so crops differ), in two class folders."""
    return write_images(root, n, classes=2, name="{i:03d}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, a base checkpoint and float32 / float16 in-memory caches made from them."""
    root = tmp_path_factory.mktemp("train")
    images = make_images(root / "images")
    torch.manual_seed(1)
    base = load_base_model(BASE, None)
    torch.save(base.state_dict(), root / "base.pth")
    base = load_base_model(BASE, root / "base.pth", img_size=32)
    source = ImageFolderSource(images)
    cache = build_memory_cache(base, source, 32, VIEWS, seed=0, k_max=K_MAX, images_per_shard=PER_SHARD,
                               source_path=str(images))
    half = MemoryCache(cache.meta, {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v)
                                    for k, v in cache.arrays.items()})
    world = {"root": root, "images": images, "base": str(root / "base.pth"), "source": source,
             "f32": cache, "f16": half}
    for dtype in ("float32", "float16"):  # real zarr caches written by stage one
        cfg = tiny_config(world, root / "unused")
        cfg.cache = replace(cfg.cache, path=str(root / f"{dtype}.zarr"), feat_dtype=dtype, attn_dtype=dtype)
        run_cache_targets(cfg)
        world[f"zarr_{dtype}"] = cfg.cache.path
    return world


def tiny_config(world, out: Path, source: str = "cache", **train) -> Config:
    cfg = Config(seed=0, output=str(out))  # the seed the caches were made with (views)
    cfg.base = replace(cfg.base, arch=BASE, checkpoint=world["base"])
    cfg.model = replace(cfg.model, arch=NEW, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg.targets = replace(cfg.targets, source=source, k=3, tau=1.0)
    cfg.data = replace(cfg.data, path=str(world["images"]), img_size=32, views=VIEWS, batch_size=4, num_workers=0)
    cfg.optim = replace(cfg.optim, blr=0.05, epochs=2, warmup_epochs=1)
    cfg.cache = replace(cfg.cache, images_per_shard=PER_SHARD, k_max=K_MAX)
    cfg.train = TrainConfig(**{"log_every": 1, "checkpoint_every": 100, **train})
    return cfg


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- data order and readers
def test_epoch_order_is_chunk_aware_and_seeded():
    shards = uniform_shards(20, 4)
    valid = np.ones(20, dtype=bool)
    valid[[3, 11]] = False
    order = epoch_order(shards, valid, seed=0, epoch=0, buffer_shards=2)
    assert sorted(order.tolist()) == [i for i in range(20) if valid[i]]
    # without invalid images, each window of 2 shards (8 images) holds exactly 2 shards, shuffled
    full = epoch_order(shards, None, seed=0, epoch=0, buffer_shards=2)
    windows = [full[i:i + 8] for i in range(0, 20, 8)]
    assert [len(set((w // 4).tolist())) for w in windows] == [2, 2, 1]
    assert not np.array_equal(np.sort(windows[0]), windows[0])
    assert np.array_equal(order, epoch_order(shards, valid, 0, 0, 2))
    assert not np.array_equal(order, epoch_order(shards, valid, 0, 1, 2))
    assert not np.array_equal(order, epoch_order(shards, valid, 1, 0, 2))


def test_view_selection_cycles_or_is_seeded():
    images = np.arange(10)
    assert (view_indices(images, 0, 5, 4, "cycle") == 1).all()
    random = view_indices(images, 0, 5, 4, "random")
    assert random.min() >= 0 and random.max() < 4 and len(set(random.tolist())) > 1
    assert np.array_equal(random, view_indices(images[::-1], 0, 5, 4, "random")[::-1])  # per image, not per slot
    assert (view_indices(images, 0, 7, 4, "fresh") == 7).all()  # crop number = epoch: new every epoch
    with pytest.raises(UserError, match="data.view_mode"):
        view_indices(images, 0, 0, 4, "new")


def test_cached_batches_read_whole_shards_and_render_bit_identical(world):
    cache = MemoryCache(world["f32"].meta, world["f32"].arrays)
    order = epoch_order(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 0, buffer_shards=2)
    plan = plan_epoch(order, view_indices(order, 0, 1, VIEWS, "cycle"), 4)
    make = CachedBatches(cache, world["source"], 32, attn_rows=3, buffer_shards=2)
    batches = [make(plan.images[b], plan.views[b]) for b in range(len(plan))]
    assert cache.reads == cache.num_shards  # every shard decoded once in the epoch
    for batch, images, views in zip(batches, plan.images, plan.views):
        assert batch["attn"].shape == (4, 3, 2, 16) and batch["topk_idx"].shape == (4, 2)
        for j, (i, v) in enumerate(zip(images, views)):
            picture = world["source"].load(int(i))
            crop = sample_view(0, int(i), int(v), picture.size[1], picture.size[0])
            assert np.array_equal(batch["crop"][j].numpy(), crop.as_array())
            assert torch.equal(batch["images"][j], render_view(picture, crop, 32))
            assert torch.equal(batch["feat"][j], torch.from_numpy(cache.arrays["feat"][i, v]))


@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("float16", "float16"), ("int8", "uint8")])
def test_compact_cached_batches_give_the_float32_targets_of_read_shard(world, tmp_path, dtypes):
    """Batches keep the stored dtypes (int8 + steps / uint8 / float16); `decode_batch`
    dequantizes them to exactly, bit for bit, the float32 values `read_shard` decodes."""
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.cache.codecs import decode_batch

    feat_dtype, attn_dtype = dtypes
    url = world.get(f"zarr_{feat_dtype}")
    if url is None:
        cfg = tiny_config(world, tmp_path / "unused")
        cfg.cache = replace(cfg.cache, path=str(tmp_path / "c.zarr"), feat_dtype=feat_dtype, attn_dtype=attn_dtype)
        run_cache_targets(cfg)
        url = cfg.cache.path
    reader = open_cache(url)
    whole = [reader.read_shard(s) for s in range(reader.num_shards)]
    ref = {name: np.concatenate([w[name] for w in whole]) for name in whole[0]}
    order = epoch_order(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 0, buffer_shards=2)
    plan = plan_epoch(order, view_indices(order, 0, 0, VIEWS, "random"), 4)
    rows = 3
    make = CachedBatches(reader, None, 32, attn_rows=rows, buffer_shards=1, render=False)  # batches straddle shards
    stored = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8}
    bits = lambda a: np.ascontiguousarray(a).view(np.uint32)  # noqa: E731  compare float32 bit patterns
    for images, views in zip(plan.images, plan.views):
        batch = make(images, views)
        assert batch["feat"].dtype == stored[feat_dtype] and batch["attn"].dtype == stored[attn_dtype]
        assert ("feat_step" in batch) == (feat_dtype == "int8")
        t = decode_batch(batch, "cpu")
        for name in ("feat", "feat_mean", "feat_std", "attn"):
            got = getattr(t, name)
            want = ref[name][images, views]
            want = want[:, :rows] if name == "attn" else want
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            assert np.array_equal(bits(got.numpy()), bits(want)), name
        assert t.topk_idx.dtype == torch.int64
        assert np.array_equal(t.topk_idx.numpy(), ref["topk_idx"][images, views, :rows - 1])
        assert np.array_equal(batch["crop"].numpy(), ref["crop"][images, views])


def test_invalid_images_are_skipped(world):
    arrays = dict(world["f32"].arrays)
    arrays["valid"] = arrays["valid"].copy()
    arrays["valid"][[0, 5]] = 0
    cache = MemoryCache(world["f32"].meta, arrays)
    from tec_pipeline.train.batches import valid_mask

    order = epoch_order(uniform_shards(N_IMAGES, PER_SHARD), valid_mask(cache), 0, 0, 2)
    assert 0 not in order and 5 not in order and len(order) == N_IMAGES - 2


def test_mask_noise_depends_on_seed_and_sample_only():
    a = mask_noise(0, 7, 4, 16)
    assert torch.equal(a, mask_noise(0, 7, 4, 16))
    assert not torch.equal(a, mask_noise(0, 8, 4, 16)) and not torch.equal(a, mask_noise(1, 7, 4, 16))
    assert torch.equal(mask_noise(0, 5, 4, 16)[2:], mask_noise(0, 7, 2, 16))  # row r is sample first + r
    # Micro-batch j of process p starts at (j * P + p) * B: batch 8 = 2 x 4 (accumulated) = 2 processes x 4.
    assert [first_sample(j, 4) for j in range(4)] == [0, 4, 8, 12]
    assert [first_sample(j, 4, 2, p) for j in range(2) for p in range(2)] == [0, 4, 8, 12]


def test_lr_schedule_warmup_then_half_cosine():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    lr = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lr[0] == 0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = TECModel(NEW, feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in no and "feat_branch.mask_token" in no
    assert "encoder.blocks.0.norm1.weight" in no and "encoder.blocks.0.attn.qkv.bias" in no
    assert "encoder.blocks.0.attn.qkv.weight" in yes and "encoder.patch_embed.proj.weight" in yes
    assert "encoder.pos_embed" not in no | yes  # fixed sin-cos: not trained
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


# ---------------------------------------------------------------- training runs
def test_resume_ends_with_the_same_weights(world, tmp_path):
    full = tiny_config(world, tmp_path / "full", checkpoint_every=2)
    run_train(full, reader=world["f32"])
    part = tiny_config(world, tmp_path / "part", checkpoint_every=2)
    stopped = run_train(part, stop_after=3, reader=world["f32"])
    assert stopped["step"] == 3 and load_checkpoint(tmp_path / "part" / CHECKPOINT)["step"] == 3
    with pytest.raises(UserError, match="--resume"):
        run_train(part, reader=world["f32"])
    run_train(part, resume=True, reader=world["f32"])
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert a["step"] == b["step"] == 8  # 16 images / batch 4 x 2 epochs
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    log_a, log_b = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in log_b] == list(range(1, 9))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert {"loss_fea", "loss_att", "lr", "images_per_s", "data_wait"} <= set(log_a[0])
    assert log_a[0]["lr"] == 0 and log_a[4]["lr"] > 0  # per-iteration warmup over the first epoch


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_once_freed(world, tmp_path):
    full = tiny_config(world, tmp_path / "full", checkpoint_every=2)
    run_train(full, reader=world["f32"])
    with small_filesystem(tmp_path / "small", "4m") as disk:
        cfg = tiny_config(world, disk / "run", checkpoint_every=2)
        run_train(cfg, stop_after=2, reader=world["f32"])
        size = (disk / "run" / CHECKPOINT).stat().st_size
        filler = fill_to(disk, size // 2)  # the log still fits, the next checkpoint does not
        with pytest.raises(UserError) as err:
            run_train(cfg, resume=True, reader=world["f32"])
        message = str(err.value)
        assert message.startswith(f"cannot write the training checkpoint {disk / 'run' / CHECKPOINT}: No space left")
        assert "free there)" in message and "\n" not in message
        assert load_checkpoint(disk / "run" / CHECKPOINT)["step"] == 2  # the last complete one still loads
        assert sorted(p.name for p in (disk / "run").iterdir() if ".tmp-" in p.name) == []
        filler.unlink()
        assert run_train(cfg, resume=True, reader=world["f32"])["step"] == 8
        resumed = load_checkpoint(disk / "run" / CHECKPOINT)["model"]
    for name, value in load_checkpoint(tmp_path / "full" / CHECKPOINT)["model"].items():
        assert torch.equal(value, resumed[name]), name


def test_resume_refuses_a_changed_run_and_allows_a_quieter_log(world, tmp_path):
    """A resume that would mix two runs (another schedule, another cache) is refused with one
    line naming the setting; logging and checkpoint cadence may change."""
    part = tiny_config(world, tmp_path / "r", checkpoint_every=2)
    part.cache = replace(part.cache, path=world["zarr_float32"])
    run_train(part, stop_after=2)
    longer = replace(part, optim=replace(part.optim, epochs=3))
    with pytest.raises(UserError, match=r"trained with optim\.epochs=2, this run has 3") as err:
        run_train(longer, resume=True)
    assert "\n" not in str(err.value)
    other_cache = replace(part, cache=replace(part.cache, path=world["zarr_float16"]))
    with pytest.raises(UserError, match=r"data\.cache\.attn_dtype=float32, this run has float16"):
        run_train(other_cache, resume=True)
    # An identity written by another version of this code records more or less: only what both
    # record is compared, so an upgrade alone does not strand a run.
    path = tmp_path / "r" / "identity.json"
    stored = json.loads(path.read_text())
    stored["checkpoint_sha256"]["base.checkpoint"] = "ab" * 32
    del stored["config"]["optim.warmup_epochs"]
    path.write_text(json.dumps(stored))
    quieter = replace(part, train=replace(part.train, log_every=4, checkpoint_every=3))
    assert run_train(quieter, resume=True)["step"] == 8


def test_resume_refuses_changed_images(world, tmp_path):
    """An image folder rebuilt at the same path is other data: its fingerprint differs."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    cfg = tiny_config(world, tmp_path / "r", source="pixels")
    cfg.data = replace(cfg.data, path=str(images))
    run_train(cfg, stop_after=1)
    first = sorted(p for p in images.rglob("*") if p.is_file())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # another file size: another dataset
    with pytest.raises(UserError, match=r"trained with data="):
        run_train(cfg, resume=True)


def test_cached_and_online_runs_give_the_same_losses(world, tmp_path):
    """Stage-one zarr caches (float32 / float16 storage) and a float32 webdataset cache against
    the base model in the loop: reading only each epoch's views changes no loss."""
    steps = 20
    wds = tiny_config(world, tmp_path / "unused")
    wds.cache = replace(wds.cache, path=str(tmp_path / "f32.wds"), store="webdataset", feat_dtype="float32",
                        attn_dtype="float32")
    run_cache_targets(wds)
    paths = {**{k.removeprefix("zarr_"): v for k, v in world.items() if k.startswith("zarr_")}, "wds": wds.cache.path}
    losses = {}
    for name, source in (("float32", "cache"), ("float16", "cache"), ("wds", "cache"), ("online", "online")):
        cfg = tiny_config(world, tmp_path / name, source=source, max_steps=steps)
        cfg.optim = replace(cfg.optim, epochs=10)
        cfg.cache = replace(cfg.cache, path=paths.get(name, ""))
        run_train(cfg)
        losses[name] = np.array([[r["loss_fea"], r["loss_att"]] for r in read_log(tmp_path / name)])
    assert losses["online"].shape == (steps, 2)
    assert np.array_equal(losses["wds"], losses["float32"])  # both stores hold the same float32 targets
    rel32 = np.abs(losses["float32"] - losses["online"]) / np.abs(losses["online"])
    rel16 = np.abs(losses["float16"] - losses["online"]) / np.abs(losses["online"])
    print(f"max relative loss difference: float32 {rel32.max():.2e}, float16 {rel16.max():.2e}")
    assert rel32.max() <= 1e-6, rel32.max()
    assert rel16.max() <= 1e-3, rel16.max()
    assert rel16.max() > 0  # float16 storage really was lossy: the comparison can fail


def without_key_biases(name: str, value: torch.Tensor) -> torch.Tensor:
    """`value` with its key-bias entries zeroed. A key bias adds q.b to every logit of a softmax
    row, so its true gradient is zero; AdamW turns the rounding noise left there into lr-sized
    steps, which differ with the summation order (accumulated or all-reduced gradients)."""
    value = value.clone()
    if name.endswith("attn.qkv.bias"):  # [q | k | v]
        third = len(value) // 3
        value[third:2 * third] = 0
    elif name == "attn_branch.head.bias":  # [q | k] of the attention-logit head
        value[len(value) // 2:] = 0
    return value


def test_one_effective_batch_split_by_accumulation_or_processes_gives_the_same_weights(world, tmp_path):
    """batch 8 = batch 4 x 2 accumulation steps = 2 processes x batch 4: same data, masks, lr, weights."""
    def config(name: str, batch: int, accum: int) -> Config:
        cfg = tiny_config(world, tmp_path / name, max_steps=3)
        cfg.cache = replace(cfg.cache, path=world["zarr_float32"])
        cfg.data = replace(cfg.data, batch_size=batch)
        cfg.optim = replace(cfg.optim, accum_steps=accum)
        return cfg

    run_train(config("whole", 8, 1))
    run_train(config("accumulated", 4, 2))
    assert run_as_ranks(run_train, config("processes", 4, 1)) == [0, 0]

    whole = load_checkpoint(tmp_path / "whole" / CHECKPOINT)
    for name in ("accumulated", "processes"):
        other = load_checkpoint(tmp_path / name / CHECKPOINT)
        assert other["step"] == whole["step"] == 3
        assert [r["loss"] for r in read_log(tmp_path / name)] == pytest.approx(
            [r["loss"] for r in read_log(tmp_path / "whole")], rel=1e-5)
        for key, value in whole["model"].items():
            torch.testing.assert_close(without_key_biases(key, other["model"][key]), without_key_biases(key, value),
                                       rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_stage.tec_losses

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] == 4:
            losses["loss_att"] = losses["loss_att"] * float("nan")
        return losses

    monkeypatch.setattr(train_stage, "tec_losses", poisoned)
    cfg = tiny_config(world, tmp_path / "nan", checkpoint_every=2)
    with pytest.raises(UserError, match=r"step 4: non-finite loss \(loss_att=nan.*checkpoint.*step 2"):
        run_train(cfg, reader=world["f32"])
    assert load_checkpoint(tmp_path / "nan" / CHECKPOINT)["step"] == 2


@pytest.mark.parametrize("override, message", [
    ({"targets.k": K_MAX + 1}, "targets.k=6 exceeds the cache's k_max=5"),
    ({"data.img_size": 64}, "data.img_size=64 differs"),
    ({"model.patch_size": 4}, "patch_size gives 64 patches per view, the cache has 16"),
])
def test_requests_the_cache_cannot_serve_are_refused_before_training(world, tmp_path, override, message):
    cfg = tiny_config(world, tmp_path / "bad")
    (key, value), = override.items()
    if key == "targets.k":
        cfg.targets = replace(cfg.targets, k=value)
    elif key == "data.img_size":
        cfg.data = replace(cfg.data, img_size=value)
        cfg.model = replace(cfg.model, arch=replace(NEW, img_size=None))
        cfg.base = replace(cfg.base, arch=replace(BASE, img_size=None))  # the cache records the base's
    else:
        cfg.model = replace(cfg.model, arch=replace(NEW, patch_size=value))
    with pytest.raises(UserError, match=message) as err:
        run_train(cfg, reader=world["f32"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad" / CHECKPOINT).exists() and not (tmp_path / "bad" / "log.jsonl").exists()


# ---------------------------------------------------------------- pixels (MAE)
def test_pixel_target_is_per_patch_normalized_pixels():
    images = torch.randn(2, 3, 32, 32)
    x = patchify(images, 8)
    assert x.shape == (2, 16, 192)
    assert torch.equal(x[0, 1, :3], images[0, :, 0, 8])  # patch (0, 1), pixel (0, 0), channels last
    t = pixel_targets(images, 8)
    assert torch.allclose(t.feat.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.feat.var(-1), torch.ones(2, 16), atol=1e-4)


def test_pixels_run_needs_no_cache_and_no_base(world, tmp_path):
    cfg = tiny_config(world, tmp_path / "mae", source="pixels", max_steps=3)
    cfg.base = replace(cfg.base, checkpoint="/nonexistent.pth")  # never opened
    summary = run_train(cfg)
    assert summary["step"] == 3 and set(summary["losses"]) == {"loss", "loss_fea"}
    kwargs = load_checkpoint(tmp_path / "mae" / CHECKPOINT)["model_kwargs"]
    assert kwargs["feat_dim"] == 8 * 8 * 3 and kwargs["attn_dim"] == 0
    assert not kwargs["input_adapter"] and not kwargs["encoder_adapter"]


def test_a_cache_made_with_another_base_is_refused(world, tmp_path):
    other = tmp_path / "other.pth"
    torch.manual_seed(5)
    torch.save(load_base_model(BASE, None).state_dict(), other)
    cfg = tiny_config(world, tmp_path / "run")
    cfg.base = replace(cfg.base, checkpoint=str(other))
    cfg.cache = replace(cfg.cache, path=world["zarr_float32"])
    with pytest.raises(UserError, match="is not the base model the cache was made with"):
        run_train(cfg)


def _train_bf16(cfg: Config, reader, out: Path) -> None:
    summary = run_train(cfg, reader=reader)
    out.write_text(json.dumps(summary))


def test_mixed_precision_trains_in_a_process_of_its_own(world, tmp_path):
    """bf16 autocast through accelerate, which keeps one precision per process: in a fresh process
    the run trains; after a full-precision run in this process it is refused in one line."""
    cfg = tiny_config(world, tmp_path / "bf16", max_steps=2)
    cfg.optim = replace(cfg.optim, mixed_precision="bf16")
    assert run_as_ranks(_train_bf16, cfg, world["f32"], tmp_path / "summary.json", world=1) == [0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and np.isfinite(summary["losses"]["loss"])
    run_train(tiny_config(world, tmp_path / "fp32", max_steps=1), reader=world["f32"])
    with pytest.raises(UserError, match="optim.mixed_precision=bf16: an earlier run in this process trained in "
                                        "another precision; run this one in its own process"):
        run_train(replace(cfg, output=str(tmp_path / "bf16_here")), reader=world["f32"])


@pytest.mark.parametrize("cache", ["memory", "zarr"])
def test_loader_workers_keep_the_batch_order(world, cache):
    """Worker w makes batches w, w+W, ...; the DataLoader's round-robin gives the order of 0 workers
    (with a zarr cache each worker reads ahead only its own views of the epoch)."""
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.train.loader import epoch_loader

    order = epoch_order(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 0, 2)
    plan = plan_epoch(order, view_indices(order, 0, 0, VIEWS, "random"), 4, first_micro=10)
    assert plan.first_samples.tolist() == [first_sample(10 + j, 4) for j in range(len(plan))]
    reader = world["f32"] if cache == "memory" else open_cache(world["zarr_float32"])
    make = CachedBatches(reader, world["source"], 32, attn_rows=4, buffer_shards=2)
    masks = partial(mask_noise, 0, batch=4, num_patches=16)
    serial = list(epoch_loader(plan, make, 1, 0, masks=masks))
    parallel = list(epoch_loader(plan, make, 1, 2, masks=masks))
    assert len(serial) == len(parallel) == len(plan) - 1
    for j, (a, b) in enumerate(zip(serial, parallel), start=1):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
        assert torch.equal(a["attn"], b["attn"])
        # Each batch's masks are those of its place in the run, whichever worker drew them.
        assert torch.equal(b["mask_noise"], mask_noise(0, first_sample(10 + j, 4), 4, 16))


def test_one_loader_across_epochs_gives_the_per_epoch_batches(world):
    """A run's loader spans epochs (workers live as long as the run): from a batch in epoch 0 to
    one in epoch 2, with 2 workers, it yields exactly the batches of the per-epoch plans, in order."""
    from tec_pipeline.train.loader import PlannedBatches, batch_loader, epoch_loader
    from tec_pipeline.train.loader import EpochPlanner

    shards = uniform_shards(N_IMAGES, PER_SHARD)
    planner = EpochPlanner(shards, None, 0, 2, VIEWS, "cycle", 4, 1, 0, batches_per_epoch=4)
    make = CachedBatches(world["f32"], world["source"], 32, attn_rows=4, buffer_shards=2)
    masks = partial(mask_noise, 0, batch=4, num_patches=16)
    spanning = list(batch_loader(PlannedBatches(planner, 4, make, 3, 10, masks), num_workers=2))
    per_epoch = [b for e in range(3) for b in epoch_loader(planner(e), make, 0, 0, masks=masks)][3:10]
    assert len(spanning) == len(per_epoch) == 7
    for a, b in zip(spanning, per_epoch):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["view"], b["view"])
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["feat"], b["feat"])
        assert torch.equal(a["mask_noise"], b["mask_noise"])
    assert [int(b["view"][0]) for b in spanning] != [int(spanning[0]["view"][0])] * 7  # views cycle by epoch


def test_loader_threads_give_the_batches_of_worker_processes(world):
    """data.loader=dali reads with threads of the training process: the same batches in the same
    order as worker processes; a thread's error reaches the consumer; stopping early ends them."""
    import threading

    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.train.loader import PlannedBatches, batch_loader
    from tec_pipeline.train.loader import EpochPlanner

    planner = EpochPlanner(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 2, VIEWS, "random", 4, 1, 0, 4)
    make = CachedBatches(open_cache(world["zarr_float32"]), world["source"], 32, attn_rows=4, buffer_shards=2,
                         files_only=True)
    masks = partial(mask_noise, 0, batch=4, num_patches=16)
    batches = PlannedBatches(planner, 4, make, 1, 11, masks)
    processes = list(batch_loader(batches, num_workers=2))
    threads = list(batch_loader(batches, num_workers=3, threads=True))
    assert len(processes) == len(threads) == 10
    for a, b in zip(processes, threads):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    running = threading.active_count()
    it = iter(batch_loader(batches, num_workers=2, threads=True))
    next(it)
    it.close()  # the consumer stops after one batch
    deadline = time.time() + 5
    while threading.active_count() > running and time.time() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == running

    class Broken:
        def expect(self, images, views):
            pass

        def __call__(self, images, views):
            raise UserError("image 3: broken on purpose")

    with pytest.raises(UserError, match="image 3: broken on purpose"):
        list(batch_loader(PlannedBatches(planner, 4, Broken(), 0, 4), num_workers=2, threads=True))


class SlowBatches:
    """A batch maker of small batches that records how many are alive (made and not yet dropped)."""

    def __init__(self, alive: dict):
        self.alive = alive

    def expect(self, images, views):
        pass

    def __call__(self, images, views):
        import weakref

        with self.alive["lock"]:
            self.alive["now"] += 1
            self.alive["most"] = max(self.alive["most"], self.alive["now"])
        time.sleep(0.002)
        batch = {"x": torch.from_numpy(images.astype(np.int64))}
        weakref.finalize(batch["x"], self.dropped)
        return batch

    def dropped(self):
        with self.alive["lock"]:
            self.alive["now"] -= 1


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_prefetch_batches_bounds_the_batches_a_threaded_loader_holds(prefetch):
    """data.prefetch_batches = P: with 4 threads and a slow step, at most P + 2 batches are alive at
    once (P made ahead, the step's, the previous one at the hand-over), every batch arrives in order,
    and the loader does run P ahead (it reaches P + 1 alive)."""
    import threading

    from tec_pipeline.train.loader import PlannedBatches, batch_loader
    from tec_pipeline.train.loader import EpochPlanner

    alive = {"lock": threading.Lock(), "now": 0, "most": 0}
    planner = EpochPlanner(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 2, VIEWS, "cycle", 2, 1, 0, 8)
    batches = PlannedBatches(planner, 8, SlowBatches(alive), 0, 24)
    seen = []
    for batch in batch_loader(batches, num_workers=4, threads=True, prefetch=prefetch):
        seen.append(batch["x"].tolist())
        time.sleep(0.01)  # the step: the loader runs ahead meanwhile
        del batch
    most = alive["most"]
    expected = [b["x"].tolist() for b in batch_loader(batches, num_workers=0)]
    assert seen == expected and len(seen) == 24
    assert prefetch + 1 <= most <= prefetch + 2


def test_prefetch_batches_is_a_setting_with_a_domain(tmp_path):
    from tec_pipeline.config import load_config
    from tec_pipeline.errors import ConfigError

    assert load_config(None, ["data.prefetch_batches=3"]).data.prefetch_batches == 3
    with pytest.raises(ConfigError, match="data.prefetch_batches"):
        load_config(None, ["data.prefetch_batches=0"])


def test_views_come_from_images_stored_in_a_webdataset_cache(world, tmp_path):
    """A cache with store_images needs no image folder: views render from its bytes, bit-identical."""
    from tec_pipeline.cache.store import open_cache
    from tec_pipeline.train.batches import cache_image_source

    cfg = tiny_config(world, tmp_path / "unused")
    cfg.cache = replace(cfg.cache, path=str(tmp_path / "wds"), store="webdataset", store_images=True)
    run_cache_targets(cfg)
    reader = open_cache(cfg.cache.path)
    source = cache_image_source(reader, data_path="")
    make = CachedBatches(reader, source, 32, attn_rows=4, buffer_shards=1)
    images, views = np.array([5, 2, 9]), np.array([1, 0, 1])
    batch = make(images, views)
    for j, (i, v) in enumerate(zip(images, views)):
        picture = world["source"].load(int(i))
        crop = sample_view(0, int(i), int(v), picture.size[1], picture.size[0])
        assert torch.equal(batch["images"][j], render_view(picture, crop, 32))


def test_missing_base_checkpoint_for_a_cached_run_is_one_clear_error():
    from tec_pipeline.train.data import CacheMismatchError, check_cache_base

    meta = {"identity": {"base": {"checkpoint_sha256": "ab" * 32}}}
    with pytest.raises(CacheMismatchError, match="base.checkpoint=nope.safetensors: file not found"):
        check_cache_base(meta, "nope.safetensors")


# ---------------------------------------------------------------- fresh crops and the authors' details
def test_fresh_views_are_new_each_epoch_seeded_and_resumable(world, tmp_path):
    """view_mode=fresh (online): crop (seed, image, epoch), so epochs differ, a rerun and a resume
    repeat them exactly; a cached run is refused with one line."""
    from tec_pipeline.train.batches import OnlineBatches

    order = epoch_order(uniform_shards(N_IMAGES, PER_SHARD), None, 0, 0, 2)
    make = OnlineBatches(world["source"], 32, 0, (0.2, 1.0))
    crops = [make(order[:4], view_indices(order[:4], 0, epoch, VIEWS, "fresh"))["crop"] for epoch in (0, 1, 2)]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])
    assert torch.equal(crops[2], make(order[:4], view_indices(order[:4], 0, 2, VIEWS, "fresh"))["crop"])
    assert torch.equal(crops[0], make(order[:4], view_indices(order[:4], 0, 0, VIEWS, "cycle"))["crop"])

    def fresh(name: str) -> Config:
        cfg = tiny_config(world, tmp_path / name, source="online", checkpoint_every=2)
        cfg.data = replace(cfg.data, view_mode="fresh")
        cfg.optim = replace(cfg.optim, epochs=3)
        return cfg
    run_train(fresh("full"))
    run_train(fresh("part"), stop_after=5)
    run_train(fresh("part"), resume=True)
    a, b = (load_checkpoint(tmp_path / n / CHECKPOINT) for n in ("full", "part"))
    assert a["step"] == b["step"] == 12 and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    cached = tiny_config(world, tmp_path / "cached")
    cached.data = replace(cached.data, view_mode="fresh")
    with pytest.raises(UserError, match="data.view_mode=fresh, targets.source=cache: .* use targets.source=online or pixels"):
        run_train(cached, reader=world["f32"])


def test_the_authors_optimizer_and_init_details_are_settings():
    """optim.decay_tokens decays the cls and mask tokens (their optimizer); the adapters' LayerNorm
    eps and the patch embedding's bias init follow model.adapter_norm_eps / patch_bias_init."""
    def build(**kwargs) -> TECModel:
        torch.manual_seed(0)
        return TECModel(NEW, feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_depth=1,
                        decoder_heads=2, **kwargs)
    ours, theirs = build(), build(adapter_norm_eps=1e-5, patch_bias_init="torch")
    names = {id(p): n for n, p in ours.named_parameters()}
    decayed = {names[id(p)] for p in param_groups(ours, 0.05, decay_tokens=True)[0]["params"]}
    assert {"encoder.cls_token", "feat_branch.mask_token", "attn_branch.mask_token"} <= decayed
    assert "encoder.blocks.0.norm1.weight" not in decayed and "encoder.blocks.0.attn.qkv.bias" not in decayed
    assert ours.encoder_adapter.norm.eps == ours.encoder_adapter.out_norm.eps == 1e-6
    assert theirs.encoder_adapter.norm.eps == theirs.encoder_adapter.out_norm.eps == 1e-5
    bias, fan_in = theirs.encoder.patch_embed.proj.bias, 3 * 8 * 8
    assert torch.count_nonzero(ours.encoder.patch_embed.proj.bias) == 0
    assert torch.count_nonzero(bias) == bias.numel() and bias.abs().max() <= fan_in ** -0.5  # Conv2d's U(+-1/sqrt(fan_in))
