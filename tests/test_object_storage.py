"""Caches on object storage, against a real S3 HTTP endpoint: moto's server on 127.0.0.1, started
and stopped here; s3fs talks to it over HTTP as to AWS."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, run_as_ranks, write_images
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.train import run_train
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.cache.storage import storage_errors
from tec_pipeline.cache.store import open_cache
from tec_pipeline.config import load_config
from tec_pipeline.errors import UserError

pytest.importorskip("moto.server", reason="the S3 test endpoint (moto[server]) is a test dependency")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def endpoint():
    """An S3 endpoint on a free local port; credentials and endpoint in the environment, as a
    user's shell would hold them (subprocesses inherit them)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    try:
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture()
def bucket(endpoint):
    """A fresh bucket per test."""
    import s3fs

    name = f"tec-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 10, classes=2)


def overrides(path: str, images: Path, *extra: str) -> list[str]:
    return [*TINY_BASE_ARGS, f"data.path={images}", "data.img_size=32", "data.views=2", "data.batch_size=6",
            "data.num_workers=0", "cache.images_per_shard=4", "cache.k_max=3", f"cache.path={path}", *extra]


def arrays(url: str) -> dict[str, np.ndarray]:
    reader = open_cache(url)
    shards = [reader.read_shard(s) for s in range(reader.num_shards)]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of the same caches on local disk, per store."""
    root = tmp_path_factory.mktemp("local")
    out = {}
    for store in ("zarr", "webdataset"):
        run_cache_targets(load_config(None, overrides(str(root / store), images, f"cache.store={store}")))
        out[store], out[f"{store}_path"] = arrays(str(root / store)), str(root / store)
    return out


def data_files(url: str) -> dict[str, str]:
    """SHA-256 of every shard data file of a cache (not its metadata, which records timings)."""
    import hashlib

    reader = open_cache(url)
    files = {rel for info in reader.doc["shards"].values() for rel in info["files"]}
    return {rel: hashlib.sha256(reader.fs.cat_file(f"{reader.root}/{rel}")).hexdigest() for rel in sorted(files)}


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_both_stages_run_on_a_bucket(store, bucket, images, reference, endpoint, tmp_path):
    """Stage one writes to s3://, reads back the same arrays as on disk, and stage two trains from it."""
    url = f"s3://{bucket}/cache.{store}"
    run_cache_targets(load_config(None, overrides(url, images, f"cache.store={store}")))
    assert open_cache(url).is_complete()
    assert_same(arrays(url), reference[store])
    cfg = load_config(None, [*overrides(url, images, f"cache.store={store}"), *TINY_MODEL_ARGS,
                             "data.num_workers=2", "targets.k=3", "train.max_steps=2", f"output={tmp_path / 'run'}"])
    summary = run_train(cfg)  # two loader workers: each makes its own S3 client after the fork
    assert summary["step"] == 2 and np.isfinite(summary["losses"]["loss"])


def test_storage_options_in_the_config_reach_the_endpoint(bucket, images, endpoint, monkeypatch):
    """No endpoint in the environment: cache.storage_options alone says where the bucket is."""
    import fsspec

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(fsspec.config, "conf", {})  # what the run sets there ends with the test
    url = f"s3://{bucket}/opts.zarr"
    run_cache_targets(load_config(None, overrides(url, images, f"cache.storage_options.endpoint_url={endpoint}")))
    assert open_cache(url).is_complete()


def test_sigkill_mid_run_then_resume_gives_the_same_bytes(bucket, images, reference):
    """Kill -9 the CLI once a shard object and its marker exist; the rerun does only the rest."""
    url = f"s3://{bucket}/killed.zarr"
    slow_writes = ("import time; from tec_pipeline.cache import writer; w = writer.CacheWriter.write_encoded_shard; "
                   "writer.CacheWriter.write_encoded_shard = lambda *a, **k: (w(*a, **k), time.sleep(1.0))[0]; "
                   "from tec_pipeline.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", slow_writes, "cache-targets", *overrides(url, images)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(open_cache(url).missing_shards()) < 3:
                    break
            except (UserError, OSError, ValueError):
                pass  # not created yet
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not open_cache(url).is_complete()
    summary = run_cache_targets(load_config(None, overrides(url, images)))
    assert 0 < summary["images"] < 10  # completed shards were skipped
    assert_same(arrays(url), reference["zarr"])
    assert data_files(url) == data_files(reference["zarr_path"])  # byte for byte, every shard object


def test_two_processes_write_one_bucket_cache(bucket, images, reference):
    url = f"s3://{bucket}/two.zarr"
    assert run_as_ranks(run_cache_targets, load_config(None, overrides(url, images)), timeout=120) == [0, 0]
    reader = open_cache(url)
    assert reader.is_complete() and reader.doc["summary"]["processes"] == 2
    assert_same(arrays(url), reference["zarr"])


def test_inspect_and_verify_find_a_deleted_and_a_truncated_shard_object(bucket, images, capsys):
    import s3fs
    from typer.testing import CliRunner

    from tec_pipeline.cli import app

    url = f"s3://{bucket}/v.zarr"
    run_cache_targets(load_config(None, overrides(url, images)))
    result = CliRunner().invoke(app, ["inspect", url])
    assert result.exit_code == 0 and "complete" in result.output.lower()
    assert verify_cache(url, sample=4)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    feat = f"{bucket}/v.zarr/feat/c/1/0/0/0"
    fs.pipe_file(feat, fs.cat_file(feat)[:-100])  # truncated
    fs.rm(f"{bucket}/v.zarr/attn/c/2/0/0/0/0")  # deleted
    capsys.readouterr()
    assert not verify_cache(url, sample=1)
    out = capsys.readouterr().out
    assert "FAIL shard 1: file feat/c/1/0/0/0" in out and "FAIL shard 2: file attn/c/2/0/0/0/0 missing" in out


def test_a_bucket_holding_another_cache_is_refused(bucket, images):
    url = f"s3://{bucket}/c.zarr"
    run_cache_targets(load_config(None, overrides(url, images)))
    with pytest.raises(UserError, match=r"was made with data\.views=2, this run has 1; use --overwrite"):
        run_cache_targets(load_config(None, overrides(url, images, "data.views=1")))  # more views would grow it


def test_a_missing_bucket_and_a_bucket_root_are_one_line_errors(endpoint, images):
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/c.zarr"
    with pytest.raises(UserError, match=r"no-such-bucket-\w+/c\.zarr: bucket 'no-such-bucket-\w+' does not exist"):
        run_cache_targets(load_config(None, overrides(missing, images)))
    with pytest.raises(UserError, match="does not exist"):
        open_cache(missing)
    with pytest.raises(UserError, match="give the cache a folder inside the bucket"):
        open_cache("s3://some-bucket")


def test_denied_access_and_unreachable_storage_are_one_line_errors():
    """What the S3 client raises for a refused request becomes one line naming the URL."""
    from botocore.exceptions import NoCredentialsError

    for err, words in ((PermissionError("AccessDenied"), "access denied"), (NoCredentialsError(), "NoCredentialsError"),
                       (ConnectionError("refused"), "not reachable")):
        with pytest.raises(UserError, match=f"s3://b/c: .*{words}"):
            with storage_errors("s3://b/c"):
                raise err
    with pytest.raises(KeyError):  # anything else is not dressed up as a storage problem
        with storage_errors("s3://b/c"):
            raise KeyError("x")
