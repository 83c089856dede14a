"""A cache that grows (`tec_pipeline.cache.growth`): `cache-targets` with more views on a complete
cache adds them as a view part and touches none of the cache's files.

The reference of every grown cache is the cache made at the larger view count in one go: the
added views must be the same crops and the same targets (the same bytes for int8; pq encodes with
the parts the cache fitted once, so its codes are checked by `verify` instead).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cache_targets import arrays, assert_same, config, kill_once_shards_are_durable, overrides
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.train import run_train
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.cache.growth import PART_PREFIX
from tec_pipeline.cache.inspect import describe_cache
from tec_pipeline.cache.reader import equal_arrays
from tec_pipeline.cache.store import open_cache
from tec_pipeline.errors import UserError
from tec_pipeline.train.log import HARMLESS_REUSE, reuse_lines, view_reuse

PQ = ("cache.feat_dtype=pq", "cache.pq_subvectors=8")
INT8 = ("cache.feat_dtype=int8", "cache.attn_dtype=uint8")


def file_digests(url: Path) -> dict[str, str]:
    """sha256 of every file of a cache but its metadata file and its view parts."""
    return {str(p.relative_to(url)): hashlib.sha256(p.read_bytes()).hexdigest() for p in url.rglob("*")
            if p.is_file() and p.name != "tec_cache.json" and not str(p.relative_to(url)).startswith(PART_PREFIX)}


def grown_and_once(tmp_path: Path, images, *extra: str) -> tuple[Path, Path, dict]:
    """A V=2 cache grown to V=4, the V=4 cache made at once, and the V=2 files' digests before growing."""
    grown, once = tmp_path / "grown.zarr", tmp_path / "once.zarr"
    run_cache_targets(config(grown, images, *extra))
    before = file_digests(grown)
    summary = run_cache_targets(config(grown, images, *extra, "data.views=4"))
    assert summary["views"] == 20 and summary["lineage"] == "made at 2 views, grown to 4 (views-2-4)"
    run_cache_targets(config(once, images, *extra, "data.views=4"))
    return grown, once, before


@pytest.mark.parametrize("store", ["zarr", "webdataset", "webdataset-images"])
def test_growth_leaves_every_file_and_adds_the_views_of_a_cache_made_at_once(images, tmp_path, store, capsys):
    kept = ("cache.store_images=true",) if store.endswith("-images") else ()
    grown, once, before = grown_and_once(tmp_path, images, f"cache.store={store.removesuffix('-images')}", *kept, *INT8)
    assert file_digests(grown) == before  # not one byte of the V=2 cache rewritten
    reader = open_cache(str(grown))
    assert (reader.views, reader.is_complete(), reader.damaged_shards()) == (4, True, {})
    assert_same(arrays(grown), arrays(once))  # the same crops and the same int8 / uint8 bytes
    # training's path: one shard's views taken through the grown cache's buffer, in any order
    made = open_cache(str(once))
    local, views = np.array([3, 0, 1, 2, 0, 3]), np.array([3, 0, 2, 1, 3, 2])
    a = reader.open_shard(1, (local, views)).take(local, views, 4)
    b = made.open_shard(1, (local, views)).take(local, views, 4)
    assert_same(a, b)
    for image, view in ((9, 3), (5, 1)):
        assert_same(reader.read_view(image, view), made.read_view(image, view))
    assert reader.image_bytes(4) == made.image_bytes(4) and (reader.image_bytes(4) is not None) == bool(kept)
    assert not list((grown / "views-2-4").glob("*-img-*"))  # the source images are stored once, by the cache
    assert verify_cache(str(grown), sample=12, seed=0)  # the base recomputes views of the cache and of its part
    out = capsys.readouterr().out
    assert "lineage: made at 2 views, grown to 4 (views-2-4)" in out
    assert any(line.startswith("ok ") and ("view 2" in line or "view 3" in line) for line in out.splitlines())


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_a_pq_cache_grows_with_the_parts_it_fitted_once(images, tmp_path, store):
    """The added views are encoded with the cache's parts: their codes are those parts' codes of
    the exact (float32) targets of a V=4 cache made at once. (Parts fitted at V=4 would differ:
    they are fitted on other views, so a pq cache made at once is not the reference here.)"""
    grown, once, before = grown_and_once(tmp_path, images, f"cache.store={store}", *PQ)
    assert file_digests(grown) == before
    a, b = arrays(grown), arrays(once)
    for key in ("crop", "attn", "topk_idx", "feat_mean", "feat_std", "valid", "label"):
        assert np.array_equal(a[key], b[key]), key
    reader, part = open_cache(str(grown)), open_cache(str(grown / "views-2-4"))
    digest = reader.meta["identity"]["cache"]["pq_parts_sha256"]
    assert part.meta["identity"]["cache"]["pq_parts_sha256"] == digest  # not fitted again
    equal = equal_arrays(reader, open_cache(str(once)))  # the studies' comparison: here all but feat agree
    assert equal == {key: key != "feat" for key in equal} and {"feat", "crop", "attn"} <= set(equal)
    exact = tmp_path / "exact.zarr"
    run_cache_targets(config(exact, images, f"cache.store={store}", "data.views=4", "cache.feat_dtype=float32",
                             "cache.attn_dtype=float32"))
    codec, feat = reader.feat_codec, torch.from_numpy(arrays(exact)["feat"][:, 2:])
    assert np.array_equal(a["feat"][:, 2:], codec.decode(codec.encode(feat)).numpy())


def test_kill_during_growth_leaves_the_cache_usable_and_a_rerun_finishes(images, tmp_path):
    """SIGKILL the CLI once a shard of the view part is durable: the cache still reads as its 2
    views, inspect says a growth is under way, and the rerun writes the rest of the part only."""
    url, once = tmp_path / "killed.zarr", tmp_path / "once.zarr"
    run_cache_targets(config(url, images))
    run_cache_targets(config(once, images, "data.views=4"))
    before = file_digests(url)
    kill_once_shards_are_durable(overrides(url, images, "data.views=4"), url / "views-2-4")
    reader = open_cache(str(url))
    assert (reader.views, reader.is_complete(), reader.damaged_shards()) == (2, True, {})
    assert np.array_equal(reader.read_shard(0)["feat"], arrays(once)["feat"][:4, :2])
    assert "growth under way: views-2-4 is not complete" in describe_cache(str(url))
    assert file_digests(url) == before
    summary = run_cache_targets(config(url, images, "data.views=4"))
    assert 0 < summary["images"] < 10  # the part's finished shards were skipped
    assert open_cache(str(url)).views == 4 and "growth under way" not in describe_cache(str(url))
    assert_same(arrays(url), arrays(once))


def test_growth_refuses_another_setting_and_fewer_views(images, tmp_path):
    url = tmp_path / "c.zarr"
    run_cache_targets(config(url, images))
    with pytest.raises(UserError, match=r"made with data\.scale_min=0\.2, this run has 0\.5") as err:
        run_cache_targets(config(url, images, "data.views=4", "data.scale_min=0.5"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"made with cache\.k_max=3, this run has 2"):
        run_cache_targets(config(url, images, "data.views=4", "cache.k_max=2"))
    run_cache_targets(config(url, images, "data.views=4"))
    with pytest.raises(UserError, match=r"made with data\.views=4, this run has 3"):
        run_cache_targets(config(url, images, "data.views=3"))
    again = run_cache_targets(config(url, images, "data.views=4"))  # a rerun at the grown count: nothing to do
    assert again.get("already_complete")
    grown = run_cache_targets(config(url, images, "data.views=5"))  # and it grows again
    assert grown["lineage"] == "made at 2 views, grown to 4 (views-2-4), 5 (views-4-5)"
    text = describe_cache(str(url))
    assert "images: 10 x 5 views = 50 views" in text and "lineage: made at 2 views, grown to 4" in text
    summary = run_cache_targets(config(url, images, "data.views=5"), overwrite=True)  # replaces the parts too
    assert summary["views"] == 50 and not list(url.glob(PART_PREFIX + "*"))
    assert "growth under way" not in describe_cache(str(url))


def test_training_from_a_grown_cache_is_training_from_one_made_at_once(images, tmp_path, capsys):
    """Same losses step by step; a run begun on the 2-view cache refuses to resume on the grown one."""
    tiny = ["model.arch.name=vit_tiny_patch16_224", "model.arch.patch_size=8", "model.arch.embed_dim=32",
            "model.arch.depth=3", "model.arch.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1",
            "model.decoder_heads=2", "targets.k=3", "optim.epochs=3", "optim.blr=0.05", "train.log_every=1",
            "data.batch_size=5"]
    grown, once = tmp_path / "grown.zarr", tmp_path / "once.zarr"
    run_cache_targets(config(grown, images))
    begun = config(grown, images, *tiny, f"output={tmp_path / 'begun'}")
    run_train(begun, stop_after=1)
    assert "each cached view is seen 1.5 times (6 steps x 5 / (10 images x 2 views))" in capsys.readouterr().out
    run_cache_targets(config(grown, images, "data.views=4"))
    run_cache_targets(config(once, images, "data.views=4"))
    with pytest.raises(UserError, match=r"was trained on a cache of 2 views; cache\.path now holds 4 \(views 2-3 "
                                        r"were added since: it grew or was remade\)") as err:
        run_train(begun, resume=True)
    assert "\n" not in str(err.value)
    losses = []
    for url, name in ((grown, "a"), (once, "b")):
        run_train(config(url, images, *tiny, f"output={tmp_path / name}"))
        records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses.append([{k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r])
    assert len(losses[0]) == 6 and losses[0] == losses[1]

def test_reuse_is_views_seen_over_views_cached_and_warns_above_the_studied_range():
    assert view_reuse(total_steps=300 * 312, effective_batch=4096, usable_images=1_281_167, views=8) == pytest.approx(
        37.4, abs=0.05)  # the ImageNet recipe: 300 epochs of whole batches over 8 views
    assert len(reuse_lines(120, 64, 64, 1)) == 1 + (120 > HARMLESS_REUSE)
    far = reuse_lines(1600 * 312, 4096, 1_281_167, 4)
    assert len(far) == 2 and "warning" in far[1]
    views = int(far[1].split("data.views=")[1].split()[0])
    assert view_reuse(1600 * 312, 4096, 1_281_167, views) <= HARMLESS_REUSE < view_reuse(1600 * 312, 4096, 1_281_167, views - 1)


def test_a_grown_list_or_a_part_unlike_the_cache_is_refused_in_one_line(images, tmp_path):
    """`grown` is part of the public format, and another writer may get it wrong: an entry that
    skips views or points out of the cache is refused before any part is opened; a listed part
    whose own metadata differs from the cache's (here its seed: other crops) is refused naming the
    key, where its views would be read as views of this cache."""
    url = tmp_path / "c.zarr"
    run_cache_targets(config(url, images))
    run_cache_targets(config(url, images, "data.views=4"))
    meta_file, part_file = url / "tec_cache.json", url / "views-2-4" / "tec_cache.json"
    doc, part = json.loads(meta_file.read_text()), json.loads(part_file.read_text())
    for entry in ({"views": [3, 4], "path": "views-3-4"}, {"views": [2, 4], "path": "../once.zarr"}):
        meta_file.write_text(json.dumps({**doc, "grown": [entry]}))
        with pytest.raises(UserError, match=rf"^cache {url}: tec_cache.json lists the view part .* after 2 views; "
                                            r"expected \{'views': \[2, <stop>\], 'path': 'views-2-<stop>'\}$"):
            open_cache(str(url))
    meta_file.write_text(json.dumps(doc))
    assert open_cache(str(url)).views == 4
    part["meta"]["identity"]["seed"] += 1
    part_file.write_text(json.dumps(part))
    with pytest.raises(UserError, match=rf"^cache {url}: its view part views-2-4 records seed=1, the cache 0: "
                                        "not a part of this cache$"):
        open_cache(str(url))


def test_a_part_that_kept_its_own_source_images_still_reads_as_part_of_its_cache(images, tmp_path):
    """Early growth copied the cache's store_images into its part; the part's copy is never read (the
    cache's own image tars serve every view), so such a part is no reason to refuse the cache."""
    url = tmp_path / "c.wds"
    kept = ("cache.store=webdataset", "cache.store_images=true")
    run_cache_targets(config(url, images, *kept))
    run_cache_targets(config(url, images, *kept, "data.views=4"))
    part_file = url / "views-2-4" / "tec_cache.json"
    part = json.loads(part_file.read_text())
    assert part["meta"]["store_images"] is False
    part["meta"]["store_images"] = True
    part_file.write_text(json.dumps(part))
    reader = open_cache(str(url))
    assert reader.views == 4 and reader.image_bytes(3) is not None and reader.read_view(3, 3)["crop"].shape == (5,)

