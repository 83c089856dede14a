"""What a cache's folder may hold and what its completion records claim: `--overwrite` removes only
a cache's own files, runs and caches never nest, a truncated or missing shard file is not
"complete" and a rerun writes that shard alone again, and one `cache-targets` at a time writes a
cache (a lock that a killed run does not leave behind)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, write_images
from tec_pipeline.cache.store import open_cache
from tec_pipeline.cli import app

RUNNER = CliRunner()


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def stage_one(url, images, *extra):
    """`cache-targets` arguments: 8 pictures, 2 views, 3 shards (3, 3, 2 images)."""
    return ["cache-targets", *TINY_BASE_ARGS, f"data.path={images}", "data.img_size=32", "data.views=2",
            "data.batch_size=6", "data.num_workers=0", "cache.images_per_shard=3", "cache.k_max=3",
            f"cache.path={url}", *extra]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under root (but those named in `skip`), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def shard_files(url: Path, shard: int) -> list[Path]:
    """The data files of one shard, either store."""
    return sorted(p for p in url.rglob("*") if p.is_file() and (f"/c/{shard}/" in str(p) or f"/c/{shard}" == str(p)[-4:]
                                                                or p.name.startswith(f"shard-{shard:05d}-")))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("safety") / "images", 8, size=(40, 40), classes=2)


@pytest.fixture()
def cache(images, tmp_path) -> Path:
    url = tmp_path / "c.zarr"
    result = invoke(*stage_one(url, images))
    assert result.exit_code == 0, result.output
    return url


# ----------------------------------------------------------------------------- nothing of the user's deleted
def test_overwrite_removes_only_the_caches_own_files(cache, images):
    (cache / "run").mkdir()
    (cache / "run" / "checkpoint.pt").write_bytes(b"a user's run")
    (cache / "notes.txt").write_text("mine")
    (cache / "feat" / "mine.txt").write_text("also mine")
    result = invoke(*stage_one(cache, images, "seed=1"), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (cache / "run" / "checkpoint.pt").read_bytes() == b"a user's run"
    assert (cache / "notes.txt").read_text() == "mine" and (cache / "feat" / "mine.txt").read_text() == "also mine"
    reader = open_cache(str(cache))
    assert reader.is_complete() and reader.meta["identity"]["seed"] == 1


def test_a_folder_of_other_files_is_never_taken_as_a_cache(images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    before = digest(folder)
    for extra in ([], ["--overwrite"]):
        line = one_error_line(invoke(*stage_one(folder, images), *extra))
        assert f"{folder} is not a tec-pipeline cache (it holds holiday.jpg" in line
    assert digest(folder) == before


@pytest.mark.parametrize("inside", ["", "run"])
def test_a_run_in_a_cache_is_refused(cache, inside):
    output = cache / inside if inside else cache
    before = digest(cache)
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, f"cache.path={cache}", f"output={output}"))
    assert f"output={output} is" in line and "cache" in line and str(cache) in line
    assert digest(cache) == before and not (cache / "run").exists()


@pytest.mark.parametrize("inside", ["", "cache.zarr"])
def test_a_cache_in_a_run_is_refused(images, tmp_path, inside):
    run = tmp_path / "run"
    run.mkdir()
    (run / "identity.json").write_text("{}")
    url = run / inside if inside else run
    line = one_error_line(invoke(*stage_one(url, images)))
    assert f"cache.path={url} is" in line and "training run" in line
    assert sorted(p.name for p in run.iterdir()) == ["identity.json"]


# ----------------------------------------------------------------------------- "complete" checked
@pytest.mark.parametrize("store", ["zarr", "webdataset"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_shard_file_is_not_complete_and_a_rerun_rewrites_that_shard(images, tmp_path, store, damage):
    url = tmp_path / "c"
    assert invoke(*stage_one(url, images, f"cache.store={store}")).exit_code == 0
    whole = digest(url, skip=("tec_cache.json",))  # its summary holds timings
    victim = shard_files(url, 1)[-1]
    rel = str(victim.relative_to(url))
    victim.write_bytes(b"") if damage == "truncate" else victim.unlink()
    untouched = {p: p.stat().st_mtime_ns for shard in (0, 2) for p in shard_files(url, shard)}

    shown = invoke("inspect", url)
    assert shown.exit_code == 0 and "shards: 2 / 3 done" in shown.stdout
    complete = next(line for line in shown.stdout.splitlines() if line.startswith("complete:"))
    assert complete.startswith("complete: no (shard 1: file " + rel) and "rerun cache-targets" in complete

    rerun = invoke(*stage_one(url, images, f"cache.store={store}"))
    assert rerun.exit_code == 0, rerun.output
    assert f"shard 1: file {rel}" in rerun.stdout and "writing it again" in rerun.stdout
    assert "cache-targets: 3 images, 6 views" in rerun.stdout  # shard 1 alone
    assert digest(url, skip=("tec_cache.json",)) == whole  # the same bytes as before the damage
    assert open_cache(str(url)).is_complete() and "complete: yes" in invoke("inspect", url).stdout
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the other shards were not rewritten


def test_verify_names_a_truncated_file(cache, capsys):
    from tec_pipeline.stages.verify import verify_cache

    feat = cache / "feat" / "c" / "2" / "0" / "0" / "0"
    feat.write_bytes(feat.read_bytes()[:10])
    assert not verify_cache(str(cache), sample=1)
    assert "FAIL shard 2: file feat/c/2/0/0/0 has 10 bytes" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one writer at a time
def test_a_second_run_on_a_locked_cache_stops_at_once_and_a_killed_holder_leaves_no_lock(images, tmp_path):
    url = tmp_path / "c.zarr"
    url.mkdir()
    holder = subprocess.Popen(  # another process holding the cache's lock, as a running cache-targets does
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(url / "tec_cache.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_error_line(invoke(*stage_one(url, images)))
        assert f"cache {url} is being written by another cache-targets run" in line and "tec_cache.lock" in line
        assert sorted(p.name for p in url.iterdir()) == ["tec_cache.lock"]  # nothing written, nothing marked done
    finally:
        holder.kill()
        holder.wait()
    result = invoke(*stage_one(url, images))  # killed: the kernel dropped its lock
    assert result.exit_code == 0, result.output
    assert open_cache(str(url)).is_complete()


def test_training_from_a_damaged_cache_is_refused_before_it_starts(cache, tmp_path):
    feat = cache / "feat" / "c" / "1" / "0" / "0" / "0"
    feat.write_bytes(b"")
    run = tmp_path / "run"
    line = one_error_line(invoke("train", *TINY_MODEL_ARGS, f"cache.path={cache}", f"output={run}"))
    assert f"cache.path={cache}: shard 1: file feat/c/1/0/0/0 has 0 bytes" in line and "rerun cache-targets" in line
    assert not (run / "checkpoint.pt").exists()
