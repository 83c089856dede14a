"""The demo set: deterministic bytes, right labels, split by source digit, 32x32 RGB, and a groups
file per split naming each image's source digit."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.demo import data as demo
from tec_pipeline.demo.data import DemoDataError, build_demo_data, group_files
from tec_pipeline.evaluate.groups import read_groups

TINY = dict(train_size=40, test_size=20, difficulty=0.5)
BESIDE_IMAGES = 3  # manifest.json, train_groups.csv, test_groups.csv


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_data(root, seed=0, **TINY)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(built, tmp_path):
    root, _ = built
    again = build_demo_data(tmp_path / "again", seed=0, **TINY)
    other = build_demo_data(tmp_path / "other", seed=1, **TINY)
    ref = all_bytes(root)
    assert len(ref) == TINY["train_size"] + TINY["test_size"] + BESIDE_IMAGES
    assert all_bytes(tmp_path / "again") == ref
    assert again["images"] == built[1]["images"]
    differ = all_bytes(tmp_path / "other")
    assert differ != ref
    assert other["source_digits"]["test"] != built[1]["source_digits"]["test"]


def test_class_folder_is_the_source_digits_label(built):
    root, manifest = built
    target = load_digits().target
    for split in ("train", "test"):
        images = manifest["images"][split]
        assert len(images["source"]) == manifest["settings"][f"{split}_size"]
        for i, (src, label) in enumerate(zip(images["source"], images["label"])):
            assert target[src] == label
            assert (root / split / str(label) / f"{i:05d}.png").is_file()
        # The reader every stage uses agrees: class index == digit.
        source = ImageFolderSource(root / split)
        for j in range(len(source)):
            folder = source.name(j).split("/")[0]
            index = int(Path(source.name(j)).stem)
            assert int(source.classes[source.label(j)]) == int(folder) == target[images["source"][index]]


def test_the_groups_files_name_each_images_source_digit(built, tmp_path):
    root, manifest = built
    target = load_digits().target
    files = group_files(root)
    assert files == {s: root / f"{s}_groups.csv" for s in ("train", "test")}
    for split in ("train", "test"):
        source = ImageFolderSource(root / split)
        groups = read_groups(files[split], source)
        assert groups.dtype == np.int64 and len(groups) == len(source)
        assert set(groups) <= set(manifest["source_digits"][split])
        assert [int(target[g]) for g in groups] == [int(source.classes[l]) for l in source.labels]
        for j in range(len(source)):
            assert groups[j] == manifest["images"][split]["source"][int(Path(source.name(j)).stem)]
    (tmp_path / "plain" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "train" / "a" / "x.png")
    with pytest.raises(DemoDataError, match="not a complete demo build") as err:
        group_files(tmp_path / "plain")
    assert "\n" not in str(err.value)


def test_a_build_without_groups_files_gets_them_from_its_manifest(tmp_path):
    """A complete build that lacks its groups files (derived data) is reused, its images untouched,
    and gains the same groups files a fresh build writes."""
    root = tmp_path / "d"
    build_demo_data(root, seed=0, **TINY)
    fresh = {s: (root / f"{s}_groups.csv").read_bytes() for s in ("train", "test")}
    for s in ("train", "test"):
        (root / f"{s}_groups.csv").unlink()
    images = {k: v for k, v in all_bytes(root).items() if k.endswith(".png")}
    build_demo_data(root, seed=0, **TINY)
    assert {s: (root / f"{s}_groups.csv").read_bytes() for s in ("train", "test")} == fresh
    assert {k: v for k, v in all_bytes(root).items() if k.endswith(".png")} == images
    (root / "test_groups.csv").unlink()
    assert group_files(root)["test"].read_bytes() == fresh["test"]  # the evaluation's way in does the same


def test_split_by_source_digit(built):
    _, manifest = built
    train, test = (set(manifest["source_digits"][s]) for s in ("train", "test"))
    assert not train & test
    assert train | test == set(range(1797))
    assert set(manifest["images"]["train"]["source"]) <= train
    assert set(manifest["images"]["test"]["source"]) <= test
    # Stratified: every class gives about a fifth of its digits to the test split.
    target = load_digits().target
    per_class = np.bincount(target[sorted(test)], minlength=10) / np.bincount(target, minlength=10)
    assert np.allclose(per_class, demo.TEST_FRACTION, atol=0.01)


def test_images_are_32px_rgb(built):
    root, _ = built
    for path in list((root / "train").rglob("*.png"))[:10] + list((root / "test").rglob("*.png"))[:10]:
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (32, 32)


def test_clutter_comes_from_the_same_split(monkeypatch, tmp_path):
    """A test digit's strokes must not appear in training images, not even as clutter."""
    seen, current = {"train": [], "test": []}, {}
    real_image, real_digit = demo.render_image, demo.render_digit

    def image_spy(settings, split, *args):
        current["split"] = split
        return real_image(settings, split, *args)

    def digit_spy(glyph, clutter, *args, **kwargs):
        seen[current["split"]].extend(clutter)
        return real_digit(glyph, clutter, *args, **kwargs)

    monkeypatch.setattr(demo, "render_image", image_spy)
    monkeypatch.setattr(demo, "render_digit", digit_spy)
    manifest = build_demo_data(tmp_path, train_size=30, test_size=30, difficulty=1.0, seed=0)
    glyphs = (load_digits().images / 16.0).astype(np.float32)
    for split in ("train", "test"):
        assert len(seen[split]) > 10
        own = glyphs[manifest["source_digits"][split]].reshape(-1, 64)
        for g in seen[split]:
            assert (own == g.reshape(1, 64)).all(1).any(), f"{split} clutter from another split"


def test_the_digit_is_drawn():
    """At difficulty 0 the centre of the image shows the digit: rendering the same draw
    with a blank glyph gives a visibly different image."""
    glyphs, labels, photos = demo.load_ingredients()
    n = demo.nuisances(0.0)
    a = demo.render_digit(glyphs[0], [], photos, n, np.random.default_rng(0)).astype(float)
    b = demo.render_digit(np.zeros((8, 8), np.float32), [], photos, n, np.random.default_rng(0)).astype(float)
    assert np.abs(a - b)[8:24, 8:24].mean() > 20


def test_the_knob_moves_every_nuisance_one_way():
    """Harder never eases a nuisance; geometry fills the first half, texture and clutter the second."""
    knobs = [demo.nuisances(d) for d in np.linspace(0, 1, 11)]
    for easy, hard in zip(knobs, knobs[1:]):
        assert hard.min_scale <= easy.min_scale and hard.min_opacity <= easy.min_opacity
        assert hard.jitter >= easy.jitter and hard.slant >= easy.slant and hard.noise >= easy.noise
        assert hard.clutter >= easy.clutter and hard.texture >= easy.texture
    default = demo.nuisances(0.5)
    assert default.jitter == 1.0 and default.texture == 0.0 and default.clutter == 0.0
    assert demo.nuisances(1.0).texture == 1.0


def test_background_texture_scales_about_the_crop_mean():
    _, _, photos = demo.load_ingredients()
    full = demo.background(photos, np.random.default_rng(3), 32, texture=1.0)
    flat = demo.background(photos, np.random.default_rng(3), 32, texture=0.0)
    half = demo.background(photos, np.random.default_rng(3), 32, texture=0.5)
    mean = full.reshape(-1, 3).mean(0)
    assert full.std() > 0.02 and np.allclose(flat, mean, atol=1e-6)
    np.testing.assert_allclose(half, (full + flat) / 2, atol=1e-6)


def test_reuse_refuse_overwrite(built, tmp_path):
    root = tmp_path / "d"
    build_demo_data(root, seed=0, **TINY)
    first = root / "train" / str(built[1]["images"]["train"]["label"][0]) / "00000.png"
    stamp = first.stat().st_mtime_ns
    build_demo_data(root, seed=0, **TINY)  # same settings: reused, nothing rewritten
    assert first.stat().st_mtime_ns == stamp
    with pytest.raises(DemoDataError, match="other settings") as err:
        build_demo_data(root, seed=1, **TINY)
    assert "\n" not in str(err.value)
    manifest = build_demo_data(root, seed=1, overwrite=True, **TINY)
    assert manifest["settings"]["seed"] == 1
    assert len(all_bytes(root)) == TINY["train_size"] + TINY["test_size"] + BESIDE_IMAGES
    assert not (root / ".partial").exists()


def test_a_build_by_an_older_renderer_is_replaced(tmp_path):
    """Its images can never match the current renderer's: rebuilt, not refused, not reused."""
    root = tmp_path / "d"
    build_demo_data(root, seed=0, **TINY)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["settings"]["renderer_version"] = demo.RENDERER_VERSION - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    stale = next((root / "train").rglob("*.png"))
    stale.write_bytes(b"old")
    rebuilt = build_demo_data(root, seed=0, **TINY)
    assert rebuilt["settings"]["renderer_version"] == demo.RENDERER_VERSION
    assert stale.read_bytes() != b"old"
    # One by a newer renderer is not this code's to redraw: refused like other settings.
    manifest["settings"]["renderer_version"] = demo.RENDERER_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DemoDataError, match="other settings"):
        build_demo_data(root, seed=0, **TINY)


def test_refuses_a_folder_that_is_not_a_demo_build(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DemoDataError, match="no manifest.json"):
        build_demo_data(tmp_path, **TINY)
    with pytest.raises(DemoDataError, match="difficulty"):
        build_demo_data(tmp_path / "x", train_size=4, test_size=4, difficulty=1.5)
