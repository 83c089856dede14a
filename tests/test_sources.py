"""Image sources: ImageFolder, webdataset tars (random access), demo; decoding of every mode."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tec_pipeline.config import DataConfig
from tec_pipeline.data import BadImageError, SourceError, decode_rgb, open_source, open_source_at
from tec_pipeline.cache_targets.view_dataset import ViewDataset, collate_views, shard_batches
from tec_pipeline.data.webdataset_source import WebDatasetSource, split_key
from tec_pipeline.errors import UserError
from tec_pipeline.views import sample_view


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def noise(size=(20, 16), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- decoding


def _mode_images() -> dict[str, tuple[bytes, str]]:
    p = Image.new("P", (12, 10))
    p.putpalette([i % 256 for i in range(768)])
    p_t = p.copy()
    p_t.info["transparency"] = b"\x00" * 256  # bytes transparency: PIL warns on a direct RGB convert
    return {
        "L": (encoded(Image.new("L", (12, 10), 77), "PNG"), "png"),
        "LA": (encoded(Image.new("LA", (12, 10), (77, 128)), "PNG"), "png"),
        "P": (encoded(p, "PNG"), "png"),
        "P+transparency": (encoded(p_t, "PNG"), "png"),
        "RGBA": (encoded(Image.new("RGBA", (12, 10), (1, 2, 3, 4)), "WEBP"), "webp"),
        "CMYK": (encoded(Image.new("CMYK", (12, 10), (10, 20, 30, 40)), "JPEG"), "jpg"),
        "I;16": (encoded(Image.new("I;16", (12, 10), 40000), "PNG"), "png"),
        "I": (encoded(Image.new("I", (12, 10), 30000), "TIFF"), "tif"),
    }


class _no_warnings:
    """Turn warnings into errors: decoding must not warn either."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_every_mode_decodes_to_rgb(mode):
    data, _ = _mode_images()[mode]
    with _no_warnings():
        im = decode_rgb(data, f"x.{mode}")
    assert im.mode == "RGB" and im.size == (12, 10)
    if mode == "I;16":
        assert im.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256: 16-bit scaled, not clipped


def test_truncated_and_non_image_are_one_line_errors(tmp_path):
    jpg = encoded(noise((64, 64)), "JPEG")
    with pytest.raises(BadImageError) as err:
        decode_rgb(jpg[: len(jpg) // 2], "cut.jpg")
    assert "cut.jpg" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BadImageError, match="text.jpg: cannot decode"):
        decode_rgb(b"hello, not an image\n" * 10, "text.jpg")


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_labels_and_raw(tmp_path):
    for cls, n in (("cat", 2), ("dog", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            noise(seed=i).save(tmp_path / cls / f"{i}.png")
    src = open_source(DataConfig(kind="imagefolder", path=str(tmp_path)))
    assert len(src) == 3 and [src.label(i) for i in range(3)] == [0, 0, 1]
    assert src.name(2) == "dog/0.png" and src.raw(2) == (tmp_path / "dog/0.png").read_bytes()
    assert src.load(0).mode == "RGB"
    before = src.fingerprint()
    noise((30, 30)).save(tmp_path / "dog" / "0.png")
    assert open_source_at("imagefolder", str(tmp_path)).fingerprint() != before


def test_imagefolder_errors_are_user_errors(tmp_path):
    with pytest.raises(SourceError, match="image folder not found"):
        open_source_at("imagefolder", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        open_source_at("imagefolder", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):  # a SourceError is a FileNotFoundError too
        open_source_at("imagefolder", str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="data.path is empty"):
        open_source_at("imagefolder", "")


def test_demo_kind_reads_the_train_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    noise().save(tmp_path / "train" / "a" / "x.png")
    src = open_source(DataConfig(kind="demo", path=str(tmp_path)))
    assert len(src) == 1 and src.name(0) == "a/x.png"
    with pytest.raises(SourceError, match="no demo data"):
        open_source_at("demo", str(tmp_path / "train"))


# ----------------------------------------------------------------------------- webdataset


@pytest.fixture
def tars(tmp_path):
    images = [noise((16 + i, 20), seed=i) for i in range(5)]
    write_tar(tmp_path / "shard-000.tar", {
        "s/0000.jpg": encoded(images[0], "JPEG"), "s/0000.cls": b"3",
        "s/0001.png": encoded(images[1], "PNG"), "s/0001.cls": b"1\n",
        "s/0001.json": b"{}",
        "s/0002.webp": encoded(images[2], "WEBP"),  # unlabelled
    })
    write_tar(tmp_path / "shard-001.tar", {
        "0003.jpeg": encoded(images[3], "JPEG"), "0003.cls": b"0",
        "0004.seg.png": encoded(images[4], "PNG"),  # extension "seg.png": not an image key
        "0005.PNG": encoded(images[4], "PNG"), "0005.cls": b"7",
    })
    return tmp_path, images


def test_split_key_is_webdatasets_rule():
    assert split_key("a/b.c/0001.seg.png") == ("a/b.c/0001", "seg.png")
    assert split_key("x.JPG") == ("x", "jpg")


def test_webdataset_random_access_labels_and_pickle(tars):
    root, images = tars
    src = WebDatasetSource(str(root / "shard-{000..001}.tar"))
    assert len(src) == 5
    assert [src.label(i) for i in range(5)] == [3, 1, -1, 0, 7]
    assert src.name(1).endswith("shard-000.tar:s/0001.png")
    assert np.array_equal(np.array(src.load(1)), np.array(images[1]))  # png: lossless
    assert src.load(4).size == images[4].size
    for i in reversed(range(5)):  # any order: seek + read
        assert src.load(i).mode == "RGB"
    clone = pickle.loads(pickle.dumps(src))  # as a DataLoader worker gets it
    assert clone.raw(2) == src.raw(2) and clone.fingerprint() == src.fingerprint()
    src.close()


def test_webdataset_fingerprint_follows_names_and_sizes(tars):
    root, _ = tars
    fp = WebDatasetSource(str(root / "shard-{000..001}.tar")).fingerprint()
    assert WebDatasetSource(str(root / "shard-{000..001}.tar")).fingerprint() == fp
    write_tar(root / "shard-001.tar", {"0003.jpeg": encoded(noise(), "JPEG")})
    assert WebDatasetSource(str(root / "shard-{000..001}.tar")).fingerprint() != fp


def test_webdataset_bad_urls(tars, tmp_path):
    root, _ = tars
    with pytest.raises(SourceError, match="shard-002.tar: tar file not found"):
        open_source(DataConfig(kind="webdataset", path=str(root / "shard-{000..002}.tar")))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(SourceError, match="junk.tar: not a readable uncompressed tar"):
        open_source_at("webdataset", str(tmp_path / "junk.tar"))
    write_tar(tmp_path / "labels.tar", {"a.txt": b"hi"})
    with pytest.raises(SourceError, match="no images"):
        open_source_at("webdataset", str(tmp_path / "labels.tar"))
    write_tar(tmp_path / "badcls.tar", {"a.png": encoded(noise(), "PNG"), "a.cls": b"cat"})
    with pytest.raises(SourceError, match="label 'cat' is not an integer"):
        open_source_at("webdataset", str(tmp_path / "badcls.tar"))


def test_webdataset_over_fsspec_url(tars):
    import fsspec

    root, _ = tars
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/wds/shard-000.tar", (root / "shard-000.tar").read_bytes())
    src = open_source_at("webdataset", "memory://wds/shard-{000..000}.tar")
    assert len(src) == 3 and src.load(0).mode == "RGB"
    fs.rm("/wds", recursive=True)


def test_corrupt_member_in_tar_is_a_bad_image(tmp_path):
    write_tar(tmp_path / "t.tar", {"a.jpg": encoded(noise(), "JPEG")[:40]})
    src = open_source_at("webdataset", str(tmp_path / "t.tar"))
    with pytest.raises(BadImageError, match="t.tar:a.jpg"):
        src.load(0)


# ----------------------------------------------------------------------------- views


def test_view_dataset_items_and_bad_image_placeholder(tmp_path):
    noise((40, 30)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    ds = ViewDataset(open_source_at("imagefolder", str(tmp_path)), seed=5, views=3, img_size=16,
                     scale=(0.3, 1.0), keep_raw=True)
    good, bad = ds[0], ds[1]
    assert good["views"].shape == (3, 3, 16, 16) and good["valid"] and good["raw"] == (tmp_path / "a.png").read_bytes()
    assert np.array_equal(good["crops"][2].numpy(), sample_view(5, 0, 2, 30, 40, (0.3, 1.0)).as_array())
    assert not bad["valid"] and "b.jpg" in bad["error"] and not bad["views"].any()
    batch = collate_views([good, bad])
    assert batch["views"].shape == (2, 3, 3, 16, 16) and batch["valid"].tolist() == [True, False]


def test_batches_never_straddle_shards():
    assert shard_batches([range(0, 4), range(8, 10)], 3) == [[0, 1, 2], [3], [8, 9]]
