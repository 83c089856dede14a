"""Frozen-feature evaluation: weighted k-NN against a slow reference, the probe, the table."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tec_pipeline.config import ViTArch
from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.demo.data import build_demo_data, group_files
from tec_pipeline.evaluate.errors import EvalError
from tec_pipeline.evaluate.features import extract_features, labelled_folder, pixel_features, random_init_like
from tec_pipeline.evaluate.groups import read_groups, write_groups
from tec_pipeline.evaluate.protocols import (PROBE_CS, choose_probe_C, knn_accuracy, knn_predict,
                                             linear_probe_accuracy, probe_split)
from tec_pipeline.evaluate.report import evaluate_models, format_table, run_eval, scored_groups
from tec_pipeline.evaluate.statistics import hit_string, paired_difference
from tec_pipeline.models.base import build_vit

TINY_VIT = ViTArch(name="vit_base_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random directions: separable when `spread` is small."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y


def reference_knn(train_X, train_y, test_X, k, T, num_classes):
    """The obvious loop, in float64."""
    train_X, test_X = np.asarray(train_X, np.float64), np.asarray(test_X, np.float64)
    preds = []
    for x in test_X:
        sims = [float(x @ t / (np.linalg.norm(x) * np.linalg.norm(t))) for t in train_X]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[train_y[i]] += np.exp(sims[i] / T)
        preds.append(int(np.argmax(votes)))
    return np.asarray(preds)


def test_knn_separable_is_perfect_and_shuffled_is_chance():
    Xtr, ytr = blobs(50, 5, 16, 0.1, seed=0)
    Xte, yte = blobs(20, 5, 16, 0.1, seed=0)
    Xte = Xte + 0.01  # not the same points as training
    assert knn_accuracy(Xtr, ytr, Xte, yte) == 1.0
    rng = np.random.default_rng(1)
    Xtr, Xte = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    acc = knn_accuracy(Xtr, rng.integers(0, 10, 500), Xte, rng.integers(0, 10, 500))
    assert 0.03 < acc < 0.2


@pytest.mark.parametrize("k,T", [(1, 0.07), (5, 0.07), (7, 1.0), (200, 0.1)])
def test_knn_matches_slow_float64_reference(k, T):
    rng = np.random.default_rng(k)
    Xtr, ytr = rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 4, 60)
    Xte = rng.normal(size=(25, 8)).astype(np.float32)
    expected = reference_knn(Xtr, ytr, Xte, min(k, 60), T, 4)
    assert (knn_predict(Xtr, ytr, Xte, k=k, T=T, num_classes=4, chunk=7) == expected).all()


def test_knn_votes_are_weighted_by_similarity():
    """One very close neighbour of class 0 outvotes two farther ones of class 1 at small T
    (a plain majority vote would say 1), but not at a large T."""
    Xtr = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    ytr = np.array([0, 1, 1])
    Xte = np.array([[1.0, 0.05]], np.float32)
    assert knn_predict(Xtr, ytr, Xte, k=3, T=0.07)[0] == 0
    assert knn_predict(Xtr, ytr, Xte, k=3, T=100.0)[0] == 1


def test_linear_probe_separable_is_high_and_shuffled_is_low():
    Xtr, ytr = blobs(40, 4, 10, 0.3, seed=2)
    Xte, yte = blobs(40, 4, 10, 0.3, seed=2)
    Xte = Xte + np.random.default_rng(3).normal(0, 0.1, Xte.shape).astype(np.float32)
    assert linear_probe_accuracy(Xtr, ytr, Xte, yte) >= 0.95
    rng = np.random.default_rng(4)
    assert linear_probe_accuracy(Xtr, rng.permutation(ytr), Xte, yte) < 0.6


def test_probe_split_holds_out_whole_groups_or_a_stratified_fifth():
    y = np.repeat(np.arange(5), 40)
    groups = np.arange(200) // 4  # 50 groups of 4 (e.g. renderings of one source digit)
    fit, val = probe_split(y, groups, seed=0)
    assert len(fit) + len(val) == 200 and not set(fit) & set(val)
    assert not set(groups[fit]) & set(groups[val])  # no group on both sides
    assert len(val) == 40  # 10 of the 50 groups
    fit, val = probe_split(y, None, seed=0)
    assert np.bincount(y[val]).tolist() == [8] * 5  # a fifth of every class
    assert not np.array_equal(probe_split(y, groups, seed=1)[1], probe_split(y, groups, seed=0)[1])


def test_probe_C_is_chosen_on_held_out_data():
    """Many noise dimensions and few samples: weak regularization overfits the noise, so the
    held-out fifth prefers a small C; few clean dimensions prefer the largest."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    X = rng.normal(0, 1, (150, 2000)).astype(np.float32)
    X[:, 0] += 0.8 * (2 * y - 1)
    assert choose_probe_C(X, y) <= 1e-3
    Xc, yc = blobs(60, 3, 4, 1.0, seed=1)  # touching blobs in 4 dims: nothing to overfit
    assert choose_probe_C(Xc, yc) == PROBE_CS[-1]


def test_hit_string_marks_right_predictions():
    assert hit_string(np.array([1, 2, 3, 0]), np.array([1, 0, 3, 3])) == "1010"


@pytest.mark.parametrize("n, a_only, b_only", [(2000, 120, 60), (1000, 30, 28), (500, 40, 0)])
def test_paired_difference_matches_the_normal_approximation(n, a_only, b_only):
    """Two classifiers that agree except on `a_only` images (only a right) and `b_only` (only b
    right): the difference of accuracies has variance var(a - b) / n; the bootstrap's 95%
    interval must match diff +- 1.96 SE, computed the slow way in float64."""
    rng = np.random.default_rng(n)
    both = rng.random(n) < 0.4
    a, b = both.copy(), both.copy()
    free = np.flatnonzero(~both)
    a[free[:a_only]] = True
    b[free[a_only:a_only + b_only]] = True
    order = rng.permutation(n)
    a, b = a[order], b[order]
    got = paired_difference("".join("1" if x else "0" for x in a), "".join("1" if x else "0" for x in b))
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / n / n) ** 0.5
    assert got["diff"] == pytest.approx((a_only - b_only) / n)
    assert got["low"] == pytest.approx(mean - 1.96 * se, abs=0.15 * 1.96 * se)
    assert got["high"] == pytest.approx(mean + 1.96 * se, abs=0.15 * 1.96 * se)


def test_paired_difference_resamples_whole_groups():
    """Each image copied 4 times, the copies one group: resampling groups must give exactly the
    interval of the uncopied images (an image-level bootstrap would halve its width)."""
    rng = np.random.default_rng(7)
    a, b = rng.random(300) < 0.5, rng.random(300) < 0.4
    text = lambda v: "".join("1" if x else "0" for x in v)  # noqa: E731
    alone = paired_difference(text(a), text(b))
    groups = np.repeat(rng.permutation(300) + 1000, 4)  # arbitrary ids, in copy order
    copies = paired_difference(text(np.repeat(a, 4)), text(np.repeat(b, 4)), groups=groups)
    assert copies["diff"] == pytest.approx(alone["diff"])
    assert copies["high"] - copies["low"] == pytest.approx(alone["high"] - alone["low"], rel=0.1)
    ungrouped = paired_difference(text(np.repeat(a, 4)), text(np.repeat(b, 4)))
    assert ungrouped["high"] - ungrouped["low"] == pytest.approx((alone["high"] - alone["low"]) / 2, rel=0.1)
    with pytest.raises(EvalError, match="groups"):
        paired_difference("01", "10", groups=np.arange(3))


def test_paired_difference_of_identical_hits_is_zero_and_lengths_must_match():
    assert paired_difference("0110", "0110") == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(EvalError, match="same images"):
        paired_difference("011", "0110")


def write_folder(root: Path, per_class: dict[str, int], seed: int, size: int = 32) -> Path:
    """An ImageFolder whose classes differ in hue (so even cosine on raw pixels separates them)."""
    rng = np.random.default_rng(seed)
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            base = np.full((size, size, 3), 40.0)
            base[..., int(c) % 3] = 220.0
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train = write_folder(root / "train", {"0": 8, "1": 8, "2": 8}, seed=0)
    test = write_folder(root / "test", {"0": 4, "2": 4}, seed=1)  # class "1" missing on purpose
    return train, test


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit(TINY_VIT).eval()


def test_extract_features_shapes_pools_and_labels_by_class_name(folders, vit):
    train, test = folders
    X, y = extract_features(vit, train, pool="cls", batch_size=5)
    assert X.dtype == np.float32 and X.shape == (24, 32) and y.dtype == np.int64
    assert y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    Xm, _ = extract_features(vit, train, pool="mean", batch_size=64)
    assert not np.allclose(X, Xm)
    # Batching does not change features.
    Xb, _ = extract_features(vit, train, pool="cls", batch_size=64)
    np.testing.assert_allclose(X, Xb, rtol=1e-4, atol=1e-5)
    # The test folder lacks class "1": labels follow the given class names, not folder positions.
    _, yte = extract_features(vit, test, classes=["0", "1", "2"])
    assert yte.tolist() == [0] * 4 + [2] * 4
    with pytest.raises(EvalError, match="pool"):
        extract_features(vit, train, pool="max")


def test_extract_features_resizes_to_the_encoder_size(folders):
    small = build_vit(ViTArch(**{**TINY_VIT.__dict__, "img_size": 16})).eval()
    X, _ = extract_features(small, folders[0])
    assert X.shape == (24, 32)
    P, _ = pixel_features(folders[0], size=8)
    assert P.shape == (24, 3 * 8 * 8)


def test_random_init_like_redraws_everything_and_keeps_the_original(vit):
    trained = random_init_like(vit, seed=5)  # a copy we may scribble on
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(3.0)
    fresh = random_init_like(trained, seed=0)
    for (name, p), q in zip(trained.named_parameters(), fresh.parameters()):
        assert not torch.allclose(p, q), name
    assert torch.equal(next(iter(random_init_like(trained, seed=0).parameters())), next(iter(fresh.parameters())))
    assert all(float(p.min()) > 1.0 for n, p in trained.named_parameters() if n.endswith("norm.weight"))


def test_evaluate_models_adds_floors_and_runs(folders, vit):
    train, test = folders
    rows = evaluate_models({"model": vit}, train, test, pool="cls", k=3)
    assert [r["name"] for r in rows] == ["pixels", "random-init", "model"]
    assert [r["dim"] for r in rows] == [3 * 32 * 32, 32, 32]
    for r in rows:
        assert set(r) == {"name", "knn", "linear", "probe_C", "dim", "hits"} and r["probe_C"] in PROBE_CS
        assert 0.0 <= r["knn"] <= 1.0 and 0.0 <= r["linear"] <= 1.0
        for metric, hits in r["hits"].items():  # one per test image, and the accuracy is their mean
            assert len(hits) == 8 and set(hits) <= {"0", "1"} and hits.count("1") / 8 == r[metric]
    assert rows[0]["knn"] == 1.0  # colours separate the classes: the pixel floor sees it
    table = format_table(rows)
    assert "random-init" in table and "100.0%" in table and len(table.splitlines()) == 4


def test_run_eval_loads_checkpoints_and_writes_json(folders, vit, tmp_path):
    ckpt = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), ckpt)
    printed = []
    out = tmp_path / "eval" / "table.json"
    rows = run_eval([("tiny", TINY_VIT, ckpt)], *folders, pool="mean", k=3, output=out, echo=printed.append)
    report = json.loads(out.read_text())
    assert report["rows"] == rows and report["pool"] == "mean"
    assert report["models"][0]["checkpoint"] == str(ckpt) and report["models"][0]["arch"]["patch_size"] == 4
    assert [r["name"] for r in rows] == ["pixels", "random-init", "tiny"]
    assert printed[-1] == format_table(rows)
    # The checkpoint was really loaded: its features equal the in-memory model's.
    direct = evaluate_models({"tiny": vit}, *folders, pool="mean", k=3, floors=False)
    assert direct[0] == rows[2]


def test_val_split_scores_held_out_source_digits_and_never_reads_the_test_folder(tmp_path, vit):
    root = tmp_path / "demo"
    build_demo_data(root, train_size=80, test_size=10, difficulty=0.5, seed=0)
    train, missing = root / "train", tmp_path / "no" / "test"
    ckpt, out = tmp_path / "vit.pth", tmp_path / "val.json"
    torch.save(vit.state_dict(), ckpt)
    groups = read_groups(group_files(root)["train"], labelled_folder(train))
    rows = run_eval([("tiny", TINY_VIT, ckpt)], train, missing, pool="mean", k=1, probe_C=0.1, output=out,
                    echo=lambda *a: None, split="val", train_groups=groups)
    by = {r["name"]: r for r in rows}
    # Scored on renderings of digits the fit part never saw: 1-NN on pixels cannot find the
    # image itself (it would score 100% if the scored images were among the fitted ones).
    assert by["pixels"]["knn"] < 0.9
    # The same numbers the slow way: whole-folder features, the held-out fifth by source digit.
    X, y = extract_features(vit, train, pool="mean")
    fit, val = probe_split(y, groups, seed=0)
    assert not set(groups[fit]) & set(groups[val]) and 8 <= len(val) <= 24
    # The scored images' source digits, for the margins' bootstrap.
    assert scored_groups("val", y, groups, None).tolist() == groups[val].tolist()
    test_groups = read_groups(group_files(root)["test"], labelled_folder(root / "test"))
    assert scored_groups("test", y, groups, test_groups).tolist() == test_groups.tolist()
    assert scored_groups("val", y, None, test_groups) is None
    assert by["tiny"]["knn"] == knn_accuracy(X[fit], y[fit], X[val], y[val], k=1)
    assert by["tiny"]["linear"] == linear_probe_accuracy(X[fit], y[fit], X[val], y[val], C=0.1)
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["test_dir"] is None
    with pytest.raises(EvalError, match="test folder"):
        evaluate_models({"tiny": vit}, train, None)
    with pytest.raises(EvalError, match="3 groups given for its 80 images"):
        evaluate_models({"tiny": vit}, train, None, split="val", train_groups=groups[:3])


def test_unlabelled_folder_is_refused(tmp_path, vit):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(EvalError, match="labelled"):
        extract_features(vit, tmp_path)


# ----------------------------------------------------------------------------- groups files
@pytest.fixture
def folder(tmp_path) -> ImageFolderSource:
    """Five images in two class folders."""
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/3.png", "b/4.png"):
        (tmp_path / "f" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "f" / name)
    return ImageFolderSource(tmp_path / "f")


@pytest.mark.parametrize("groups", [[7, -1, 7, 12, 0], ["x", "y", "x", "3", "z"]])
def test_groups_round_trip_in_the_folders_order(folder, tmp_path, groups):
    """Written in any row order, read back in the folder's: integers as int64 (they sort as
    numbers), anything else as strings."""
    names = [folder.name(i) for i in range(len(folder))]
    path = write_groups(tmp_path / "g.csv", names[::-1], groups[::-1])
    assert path.read_text().splitlines()[0] == "image,group"
    found = read_groups(path, folder)
    assert found.tolist() == groups
    assert (found.dtype == np.int64) if isinstance(groups[0], int) else (found.dtype.kind == "U")


def test_groups_file_tolerates_spaces_blank_lines_and_dot_slash(folder, tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("image, group\n./a/1.png, 1\na/2.png,1\n\nb/1.png,2\nb/3.png,2\nb/4.png,3\n")
    assert read_groups(path, folder).tolist() == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("text, needle", [
    ("img,group\na/1.png,1\n", "row 1: header 'img,group', expected the header 'image,group'"),
    ("", "row 1: an empty file"),
    ("image,group\na/1.png,1\nc/9.png,2\n", "row 3: image 'c/9.png' is not in"),
    ("image,group\na/1.png,1\na/1.png,2\n", "row 3: image 'a/1.png' listed again (first on row 2)"),
    ("image,group\na/1.png,1,extra\n", "row 2: 3 fields, expected image,group"),
    ("image,group\na/1.png,\n", "row 2: empty group"),
    ("image,group\na/1.png,1\na/2.png,1\nb/1.png,2\nb/3.png,2\n", "no row for image 'b/4.png'"),
    ("image,group\na/1.png,1\n", "no row for image 'a/2.png' of"),
])
def test_a_bad_groups_file_is_one_line_naming_the_file_and_row(folder, tmp_path, text, needle):
    path = tmp_path / "g.csv"
    path.write_text(text)
    with pytest.raises(EvalError) as err:
        read_groups(path, folder)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}") and needle in message, message


def test_an_unreadable_groups_file_is_one_line(folder, tmp_path):
    for path in (tmp_path / "missing.csv", tmp_path):
        with pytest.raises(EvalError, match="cannot read the groups file") as err:
            read_groups(path, folder)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"image,group\n\xff\xfe,1\n")
    with pytest.raises(EvalError, match="binary.csv: cannot read the groups file"):
        read_groups(binary, folder)
