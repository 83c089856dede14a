"""Bad or hostile input at the command line: each is one red line on stderr naming the key, file or
value, exit 2, and leaves nothing behind that a corrected rerun would trip over."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, write_images
from tec_pipeline.cache.store import open_cache
from tec_pipeline.cli import app

RUNNER = CliRunner()


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def stage_one(url, images, *extra):
    return ["cache-targets", *TINY_BASE_ARGS, f"data.path={images}", "data.img_size=32", "data.views=2",
            "data.batch_size=8", "data.num_workers=0", "cache.images_per_shard=4", "cache.k_max=3",
            f"cache.path={url}", *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("faults") / "images", 6, size=(40, 40), classes=2)


# ----------------------------------------------------------------------------- config files and domains
def test_a_duplicated_key_in_a_config_file_is_one_line_and_nothing_is_written(images, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("data: {views: 2}\nseed: 0\ndata: {img_size: 64}\n")
    line = one_error_line(invoke(*stage_one(tmp_path / "c.zarr", images), "-c", config, "--dry-run"))
    assert f"{config}, line 3: key 'data' appears twice" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.yaml"]


@pytest.mark.parametrize("content, needle", [(b"", "the config file is empty"), (b"\xff\xfe\x00binary", "not a text file"),
                                             (b"[1, 2]", "must hold a mapping")])
@pytest.mark.parametrize("command", ["cache-targets", "train", "finetune"])
def test_an_empty_binary_or_list_config_is_one_line(tmp_path, content, needle, command):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    assert needle in one_error_line(invoke(command, "-c", config))


def test_a_directory_as_config_is_called_a_directory(tmp_path):
    assert one_error_line(invoke("train", "-c", tmp_path)).endswith(f"{tmp_path}: a directory, not a config file")


@pytest.mark.parametrize("bad, good", [("cache.zstd_level=23", "cache.zstd_level=3"), ("seed=-1", "seed=1")])
def test_a_value_that_would_fail_mid_run_stops_before_the_cache_exists(images, tmp_path, bad, good):
    url = tmp_path / "c.zarr"
    line = one_error_line(invoke(*stage_one(url, images, bad)))
    assert line.startswith(f"error: {bad}: expected a value in [")
    assert not url.exists()
    result = invoke(*stage_one(url, images, good))  # the corrected rerun is not refused
    assert result.exit_code == 0, result.output
    assert open_cache(str(url)).is_complete()


@pytest.mark.parametrize("command", ["train", "linprobe"])
def test_a_zero_batch_is_one_line(command, tmp_path):
    args = [f"data.train={tmp_path}", f"data.val={tmp_path}"] if command == "linprobe" else TINY_MODEL_ARGS
    line = one_error_line(invoke(command, *args, "data.batch_size=0", f"output={tmp_path / 'run'}"))
    assert line == "error: data.batch_size=0: expected a value >= 1"
    assert not (tmp_path / "run").exists()


def test_a_billion_views_dry_run_is_refused_at_once(images, tmp_path):
    line = one_error_line(invoke(*stage_one(tmp_path / "c.zarr", images, "data.views=1000000000"), "--dry-run"))
    assert line == "error: data.views=1000000000: expected a value in [1, 1024]"
