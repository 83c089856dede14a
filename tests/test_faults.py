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
    args = [f"data.train={tmp_path}", f"data.val={tmp_path / 'val'}"] if command == "linprobe" else TINY_MODEL_ARGS
    line = one_error_line(invoke(command, *args, "data.batch_size=0", f"output={tmp_path / 'run'}"))
    assert line == "error: data.batch_size=0: expected a value >= 1"
    assert not (tmp_path / "run").exists()


def test_a_billion_views_dry_run_is_refused_at_once(images, tmp_path):
    line = one_error_line(invoke(*stage_one(tmp_path / "c.zarr", images, "data.views=1000000000"), "--dry-run"))
    assert line == "error: data.views=1000000000: expected a value in [1, 1024]"


# ----------------------------------------------------------------------------- the command-level guard
def test_an_unexpected_error_is_one_line_and_tec_debug_shows_its_traceback(monkeypatch):
    from tec_pipeline.cache import inspect as inspect_module

    def boom(url):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(inspect_module, "describe_cache", boom)
    line = one_error_line(invoke("inspect", "x"))
    assert line == "error: unexpected RuntimeError: boom (during inspect); run with TEC_DEBUG=1 for the traceback"
    monkeypatch.setenv("TEC_DEBUG", "1")
    result = invoke("inspect", "x")
    assert isinstance(result.exception, RuntimeError) and str(result.exception).startswith("boom")


def test_an_os_error_is_one_line_naming_the_path(monkeypatch):
    from tec_pipeline.cache import inspect as inspect_module

    def denied(url):
        raise PermissionError(13, "Permission denied", "/some/where/tec_cache.json")

    monkeypatch.setattr(inspect_module, "describe_cache", denied)
    line = one_error_line(invoke("inspect", "x"))
    assert line == "error: /some/where/tec_cache.json: Permission denied (during inspect)"


def test_a_read_only_output_is_one_line_for_either_stage(images, tmp_path):
    from helpers import small_filesystem

    with small_filesystem(tmp_path / "ro", read_only=True) as ro:
        line = one_error_line(invoke(*stage_one(ro / "c.zarr", images)))
        assert f"{ro / 'c.zarr'}" in line and "Read-only file system" in line
        line = one_error_line(invoke("train", *TINY_MODEL_ARGS, "targets.source=pixels", f"data.path={images}",
                                     f"output={ro / 'run'}"))
        assert f"{ro / 'run'}" in line and "Read-only file system" in line
        assert list(ro.iterdir()) == []


def test_a_write_under_a_file_reports_the_write_not_its_clean_up(tmp_path):
    from tec_pipeline.errors import StorageError
    from tec_pipeline.files import write_json

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"^cannot write the run's config .*/file/config.json: "):
        write_json(tmp_path / "file" / "config.json", {}, "the run's config")


def test_an_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, f"output={tmp_path / 'run'}"))
    assert line == f"error: output={tmp_path / 'run'} is a file, not a folder: choose another output"


@pytest.mark.parametrize("content, why", [("{not json", "not valid JSON"), ("[1, 2]", "no 'meta' mapping"),
                                          ('{"format_version": 2}', "no 'meta' mapping")])
def test_a_damaged_cache_metadata_file_is_one_line_and_overwrite_rebuilds(images, tmp_path, content, why):
    url = tmp_path / "c.zarr"
    assert invoke(*stage_one(url, images)).exit_code == 0
    (url / "tec_cache.json").write_text(content)
    for args in (["inspect", url], ["verify", url], ["train", *TINY_MODEL_ARGS, f"cache.path={url}",
                                                     f"output={tmp_path / 'run'}"], stage_one(url, images)):
        line = one_error_line(invoke(*args))
        assert f"cache {url}: tec_cache.json is damaged ({why}" in line and "--overwrite" in line
    result = invoke(*stage_one(url, images), "--overwrite")
    assert result.exit_code == 0, result.output
    assert open_cache(str(url)).is_complete()


def test_a_format_version_that_is_not_major_minor_is_named(images, tmp_path):
    import json

    url = tmp_path / "c.zarr"
    assert invoke(*stage_one(url, images)).exit_code == 0
    doc = json.loads((url / "tec_cache.json").read_text())
    (url / "tec_cache.json").write_text(json.dumps({**doc, "format_version": "2"}))
    assert "tec_cache.json is damaged (format_version '2' is not MAJOR.MINOR)" in one_error_line(invoke("inspect", url))


@pytest.mark.parametrize("url, needle", [("foo://x/c.zarr", "storage protocol 'foo' is not available here"),
                                         ("s3://", "no bucket named")])
def test_a_cache_url_that_names_no_usable_place_is_one_line(images, url, needle):
    pytest.importorskip("s3fs")
    assert needle in one_error_line(invoke(*stage_one(url, images)))
    assert needle in one_error_line(invoke("inspect", url))


def test_an_unreachable_endpoint_is_not_called_a_missing_bucket(images, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    for key, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    import fsspec

    # cache.storage_options become the process's s3 defaults: restore them for the tests after this one
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(fsspec.config.conf.get("s3", {})))
    config = tmp_path / "s3.yaml"  # a port with no server; one attempt, not botocore's retries
    config.write_text("cache:\n  storage_options:\n    endpoint_url: http://127.0.0.1:9\n"
                      "    config_kwargs: {retries: {max_attempts: 1}}\n")
    line = one_error_line(invoke(*stage_one("s3://bucket/c.zarr", images), "-c", config))
    assert "storage not reachable" in line and "does not exist" not in line


def test_verify_with_a_negative_sample_is_one_line(tmp_path):
    assert one_error_line(invoke("verify", tmp_path, "--sample", "-1")).startswith("error: --sample -1: expected")


def test_a_text_file_as_a_checkpoint_is_one_line_naming_it(images, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_text("hello, not a checkpoint\n")
    for args in (["export", run], ["train", *TINY_MODEL_ARGS, "targets.source=pixels", f"data.path={images}",
                                   "data.num_workers=0", f"output={run}", "--resume"]):
        line = one_error_line(invoke(*args))
        assert f"{run / 'checkpoint.pt'}: not a tec-pipeline checkpoint" in line and "weights_only" not in line


def test_a_garbage_safetensors_file_is_one_line_naming_it(images, tmp_path):
    garbage = tmp_path / "encoder.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    val = write_images(tmp_path / "val", 2, size=(40, 40), classes=2, seed=1)  # scored on other images than trained on
    line = one_error_line(invoke("finetune", f"model.checkpoint={garbage}", f"data.train={images}",
                                 f"data.val={val}", f"output={tmp_path / 'ft'}"))
    assert f"{garbage}: not a safetensors checkpoint" in line


# ----------------------------------------------------------------------------- values outside their meaning
def test_eval_with_no_neighbours_is_one_line(images, tmp_path):
    from tec_pipeline.evaluate.report import evaluate_models
    from tec_pipeline.errors import UserError

    with pytest.raises(UserError, match=r"^--k 0: the k-NN needs at least one neighbour$"):
        evaluate_models({}, images, images, k=0, floors=False)


def test_eval_refuses_test_classes_that_never_occur_in_training(tmp_path):
    """Their images could never be classified right: the score would be capped without a word."""
    train = write_images(tmp_path / "train", 4, size=(32, 32), classes=2)  # c0, c1
    test = write_images(tmp_path / "test", 2, size=(32, 32), classes=1)  # c0
    (test / "c0").rename(test / "c7")
    from tec_pipeline.evaluate.report import evaluate_models
    from tec_pipeline.errors import UserError

    with pytest.raises(UserError) as err:
        evaluate_models({}, train, test, floors=False)
    assert str(err.value) == f"{test}: class folders ['c7'] never occur in the training folder {train}"


def test_fine_tuning_on_one_class_is_one_line(tmp_path):
    one = write_images(tmp_path / "one", 4, size=(32, 32), classes=1)
    val = write_images(tmp_path / "val", 2, size=(32, 32), classes=1, seed=1)
    line = one_error_line(invoke("finetune", f"data.train={one}", f"data.val={val}", "data.img_size=32",
                                 f"output={tmp_path / 'ft'}"))
    assert line == f"error: data.train={one}: its images are of 1 class (c0); fine-tuning and probing need at least two"
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()


def test_an_ablation_rows_error_names_its_file(tmp_path):
    row = tmp_path / "x1_row.yaml"
    row.write_text("# Tab. 6(x) a typo\ntargets: {kk: 3}\n")
    result = invoke("ablate", row, "--cache", tmp_path, "--output", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert f"refused: {row}: bad config key 'targets.kk'" in result.stdout
