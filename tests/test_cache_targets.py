"""Stage one end to end on a tiny base (ViT dim 32, depth 2, 2 heads, patch 8, 32 px images).

The reference is one uninterrupted in-process run into ``memory://``; every other way of
producing the cache (resumed after SIGKILL, two processes, DataLoader workers) must give the
same decoded arrays.
"""
from __future__ import annotations

import io
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from helpers import fill_to, run_as_ranks, small_filesystem
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.cache.store import open_cache
from tec_pipeline.config import load_config
from tec_pipeline.errors import UserError
from tec_pipeline.render import dali_missing
from tec_pipeline.cache_targets.processes import own_shards

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 10
TINY_BASE = ["base.arch.name=vit_tiny_patch16_224", "base.arch.patch_size=8", "base.arch.embed_dim=32",
             "base.arch.depth=2", "base.arch.num_heads=2"]


def overrides(url, data_path, *extra: str) -> list[str]:
    return TINY_BASE + [f"data.path={data_path}", "data.img_size=32", "data.views=2", "data.batch_size=6",
                        "data.num_workers=0", "cache.images_per_shard=4", "cache.k_max=3",
                        f"cache.path={url}", *extra]


def config(url, data_path, *extra: str):
    return load_config(None, overrides(url, data_path, *extra))


def picture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def arrays(url) -> dict[str, np.ndarray]:
    """Every shard of a cache, decoded and concatenated."""
    reader = open_cache(str(url))
    shards = [reader.read_shard(s) for s in range(reader.num_shards)]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def write_images(root: Path) -> Path:
    """10 images in 2 class folders under `root`, assorted sizes and modes."""
    modes = ["RGB", "L", "RGBA", "P", "RGB"]
    for i in range(NUM_IMAGES):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        picture(i, (36 + 3 * i, 40 - i), modes[i % 5]).save(root / f"c{i % 2}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def reference(images):
    url = "memory://reference.zarr"
    summary = run_cache_targets(config(url, images))
    yield url, summary, arrays(url)
    fsspec.filesystem("memory").rm("/reference.zarr", recursive=True)


# ----------------------------------------------------------------------------- basic run


def test_run_into_memory_url_is_complete_and_verifies(reference, images, capsys):
    url, summary, data = reference
    assert (summary["images"], summary["views"], summary["skipped"]) == (NUM_IMAGES, 2 * NUM_IMAGES, [])
    reader = open_cache(url)
    assert reader.is_complete() and reader.missing_shards() == []
    assert data["feat"].shape == (NUM_IMAGES, 2, 16, 32) and data["attn"].shape == (NUM_IMAGES, 2, 4, 2, 16)
    assert data["valid"].all() and data["label"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    meta = reader.meta
    assert meta["source"]["kind"] == "imagefolder" and meta["base"]["checkpoint"] is None
    assert meta["identity"]["base"]["checkpoint_sha256"].startswith("random-init:")
    assert verify_cache(url, sample=5, seed=1)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 5
    # A second run over the complete cache computes nothing.
    again = run_cache_targets(config(url, images))
    assert again["images"] == 0 and again.get("already_complete")


def test_workers_give_the_same_arrays(reference, images):
    url = "memory://workers.zarr"
    run_cache_targets(config(url, images, "data.num_workers=2", "data.batch_size=4"))
    assert_same(arrays(url), reference[2])


def test_config_mismatch_is_refused_and_overwrite_replaces(reference, images):
    url = "memory://mismatch.zarr"
    run_cache_targets(config(url, images))
    with pytest.raises(UserError, match="made with data.views=2, this run has 1") as err:  # more views grow it
        run_cache_targets(config(url, images, "data.views=1"))
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(UserError, match="data.scale_min=0.2, this run has 0.5"):
        run_cache_targets(config(url, images, "data.scale_min=0.5"))
    summary = run_cache_targets(config(url, images, "data.views=3"), overwrite=True)
    assert summary["views"] == 3 * NUM_IMAGES and open_cache(url).views == 3


def test_dry_run_measures_and_writes_nothing(images, tmp_path, capsys):
    url = tmp_path / "sub" / "dry.zarr"
    est = run_cache_targets(config(url, images), dry_run=True)
    assert est["bytes_per_view"] > 0 and est["total_views"] == 2 * NUM_IMAGES
    assert est["free_bytes"] > 0 and est["est_seconds"] > 0
    assert not url.exists() and list(tmp_path.iterdir()) == []
    assert "KB/view" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad images


# Both renderers where DALI has a wheel (it must then be installed: the set-up installs it).
LOADERS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    dali_missing() is not None and platform.machine() != "x86_64", reason="no DALI wheel for this machine"))]


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_images_stop_the_run_or_are_skipped(images, tmp_path, capsys, loader):
    """Whoever decodes (the loader workers, or DALI on the device), a bad file is one line naming it."""
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(3):
        picture(i, (40, 40)).save(root / f"a{i}.png")
    jpeg = io.BytesIO()
    picture(9, (64, 64)).save(jpeg, "JPEG")
    (root / "b_truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "c_text.jpg").write_bytes(b"just some text, not a picture\n")
    with pytest.raises(UserError, match="b_truncated.jpg: cannot decode") as err:
        run_cache_targets(config(f"memory://bad-{loader}.zarr", root, f"data.loader={loader}"))
    assert "\n" not in str(err.value)
    summary = run_cache_targets(config(f"memory://bad-{loader}.zarr", root, "data.on_bad_image=skip",
                                       f"data.loader={loader}"), overwrite=True)
    assert [s["name"] for s in summary["skipped"]] == ["b_truncated.jpg", "c_text.jpg"]
    out = capsys.readouterr().out
    assert "2 skipped" in out and "skipped c_text.jpg" in out
    reader = open_cache(f"memory://bad-{loader}.zarr")
    assert reader.is_complete() and [s["name"] for s in reader.doc["summary"]["skipped"]] == ["b_truncated.jpg", "c_text.jpg"]
    data = arrays(f"memory://bad-{loader}.zarr")
    assert data["valid"].tolist() == [1, 1, 1, 0, 0] and not data["feat"][3:].any()
    assert verify_cache(f"memory://bad-{loader}.zarr", sample=10)


@pytest.mark.parametrize("extra, message", [
    (["data.views=0"], "data.views=0"),
    (["cache.k_max=17"], "cache.k_max=17 exceeds the 16 patches"),
    (["data.img_size=36"], "data.img_size=36, base.arch.patch_size=8: the image is cut into whole patches"),
    (["base.checkpoint=/nonexistent/mae.pth"], "checkpoint file not found"),
    (["base.arch.name=no_such_vit"], "base.arch.name='no_such_vit'"),
    (["targets.last_layers=3"], "targets.last_layers=3, base.arch.depth=2: the feature target averages the base's"),
    (["base.arch.depth=null", "targets.last_layers=13"], "targets.last_layers=13, base.arch.depth=12: the feature"),
    (["data.scale_min=0"], "data.scale_min=0"),
    (["cache.images_per_shard=0"], "cache.images_per_shard=0"),
    (["data.path={tmp}/missing"], "image folder not found"),
    (["data.path={tmp}/empty"], "no images"),
    (["data.kind=webdataset", "data.path={tmp}/shard-{{000..001}}.tar"], "shard-000.tar: tar file not found"),
    (["base.compute_dtype=fp8"], "base.compute_dtype=fp8: expected one of auto, fp16, bf16, fp32"),
    (["cache.writer_threads=0"], "cache.writer_threads=0: expected a value >= 1"),
])
def test_bad_settings_are_one_line_errors(images, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(UserError) as err:
        run_cache_targets(config("memory://never.zarr", images, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not fsspec.filesystem("memory").exists("/never.zarr")


def test_cli_prints_one_red_line(images):
    from typer.testing import CliRunner

    from tec_pipeline.cli import app

    result = CliRunner().invoke(app, ["cache-targets", *overrides("memory://cli.zarr", images, "data.views=0")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: data.views=0: expected a value in [1, 1024]"]


# ----------------------------------------------------------------------------- integrity


def test_verify_detects_corrupt_and_missing_chunks(reference, images, tmp_path, capsys):
    url = tmp_path / "v.zarr"
    run_cache_targets(config(url, images))
    assert_same(arrays(url), reference[2])
    assert verify_cache(str(url), sample=2 * NUM_IMAGES)
    feat = url / "feat" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(feat.read_bytes())
    raw[20:60] = bytes(40)  # zeros in the middle of shard 1's feature chunks
    feat.write_bytes(bytes(raw))
    capsys.readouterr()
    assert not verify_cache(str(url), sample=2 * NUM_IMAGES)
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert fails and all("image" in line or "shard" in line for line in fails)
    (url / "attn" / "c" / "2" / "0" / "0" / "0" / "0").unlink()
    assert not verify_cache(str(url), sample=1)
    assert "FAIL shard 2: file attn/c/2/0/0/0/0 missing" in capsys.readouterr().out


def kill_once_shards_are_durable(args: list[str], watched: Path) -> None:
    """Run ``cache-targets args`` in a process whose shard writes each take a second longer,
    and SIGKILL it once the cache at `watched` has all but two of its shards durable."""
    slow_writes = ("import time; from tec_pipeline.cache import writer; w = writer.CacheWriter.write_encoded_shard; "
                   "writer.CacheWriter.write_encoded_shard = lambda *a, **k: (w(*a, **k), time.sleep(1.0))[0]; "
                   "from tec_pipeline.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", slow_writes, "cache-targets", *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(open_cache(str(watched)).missing_shards()) < 3:
                    break
            except (UserError, OSError, ValueError):
                pass  # not created yet, or its metadata being written
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.parametrize("loader", LOADERS)
def test_sigkill_mid_run_then_rerun_gives_identical_arrays(reference, images, tmp_path, loader):
    """Kill -9 the CLI once a shard is durable; the rerun redoes only the rest, same arrays."""
    url = tmp_path / "killed.zarr"
    if loader == "pil":
        expected = reference[2]
    else:  # an uninterrupted run with the same renderer
        run_cache_targets(config(tmp_path / "whole.zarr", images, f"data.loader={loader}"))
        expected = arrays(tmp_path / "whole.zarr")
    kill_once_shards_are_durable(overrides(url, images, f"data.loader={loader}"), url)
    reader = open_cache(str(url))
    assert not reader.is_complete() and 0 < len(reader.missing_shards()) < 3
    assert not verify_cache(str(url), sample=1)  # incomplete is never reported as fine
    summary = run_cache_targets(config(url, images, f"data.loader={loader}"))
    assert 0 < summary["images"] < NUM_IMAGES  # completed shards were skipped
    assert open_cache(str(url)).is_complete()
    assert_same(arrays(url), expected)


# ----------------------------------------------------------------------------- processes


def test_shards_split_into_contiguous_ranges():
    assert [list(own_shards(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(own_shards(1, r, 3)) for r in range(3)] == [[0], [], []]


def _fail_on_main(out: Path) -> None:
    """One rank's part of the test below: rank 0's step stops with an OSError; what each rank raised."""
    from tec_pipeline.cache_targets.processes import on_main, process_state

    state = process_state()
    try:
        on_main(lambda: (_ for _ in ()).throw(OSError("disk full")), state)
    except Exception as err:
        (out / f"rank{state.process_index}").write_text(f"{type(err).__name__}: {err}")
        raise


def test_an_error_on_rank_0_stops_every_rank_with_its_name(tmp_path):
    """Not only refusals: an OSError on rank 0 (a full disk, say) reaches rank 1 as what it was,
    in one line, where rank 1 used to learn only that its peer had gone (gloo: "Connection closed
    by peer"; NCCL may instead wait out its timeout). Rank 0 raises the OSError itself."""
    assert run_as_ranks(_fail_on_main, tmp_path, timeout=60) == [1, 1]  # None would mean a rank still waited
    assert (tmp_path / "rank0").read_text() == "OSError: disk full"
    assert (tmp_path / "rank1").read_text() == "UserError: rank 0 stopped: OSError: disk full"


def test_two_processes_give_the_same_arrays(reference, images, tmp_path):
    url = tmp_path / "two.zarr"
    assert run_as_ranks(run_cache_targets, load_config(None, overrides(url, images)), timeout=120) == [0, 0]
    reader = open_cache(str(url))
    assert reader.is_complete() and reader.doc["summary"]["processes"] == 2
    assert_same(arrays(url), reference[2])


# ----------------------------------------------------------------------------- webdataset


def test_webdataset_source_into_webdataset_store(images, tmp_path):
    files = sorted(images.rglob("*.png"))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i, path in enumerate(files):
            tf.add(path, arcname=f"{i:04d}.png")
            label = f"{int(path.parent.name[1])}".encode()
            info = tarfile.TarInfo(f"{i:04d}.cls")
            info.size = len(label)
            tf.addfile(info, io.BytesIO(label))
    url = "memory://wds-cache"
    summary = run_cache_targets(config(url, tmp_path / "shard-{000..000}.tar", "data.kind=webdataset",
                                       "cache.store=webdataset", "cache.store_images=true"))
    assert summary["images"] == NUM_IMAGES
    reader = open_cache(url)
    assert reader.is_complete() and reader.image_bytes(3) == files[3].read_bytes()
    assert arrays(url)["label"].tolist() == [int(p.parent.name[1]) for p in files]
    assert verify_cache(url, sample=3)


def test_checkpoint_is_recorded_and_checked_by_verify(images, tmp_path, capsys):
    import torch

    from tec_pipeline.config import ViTArch
    from tec_pipeline.models.base import build_vit, file_sha256

    arch = ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    ckpt = tmp_path / "base.pth"
    torch.save({"model": build_vit(arch).state_dict()}, ckpt)  # MAE layout
    url = "memory://ckpt.zarr"
    run_cache_targets(config(url, images, f"base.checkpoint={ckpt}"), overwrite=True)
    meta = open_cache(url).meta
    assert meta["base"]["checkpoint"] == str(ckpt) and meta["base"]["checkpoint_sha256"] == file_sha256(ckpt)
    assert verify_cache(url, sample=2)
    torch.save({"model": build_vit(arch).state_dict()}, ckpt)  # other weights, same path
    capsys.readouterr()
    assert not verify_cache(url, sample=2)
    assert "FAIL base weights differ" in capsys.readouterr().out


# ----------------------------------------------------------------------------- writer threads, precision


def file_bytes(url) -> dict[str, bytes]:
    """Every file of a local cache but its metadata file (whose summary holds timings)."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "tec_cache.json"}


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_writer_threads_and_direct_io_change_no_byte(images, tmp_path, store):
    runs = {}
    for threads, direct in ((1, "true"), (3, "true"), (1, "false")):
        url = tmp_path / f"{threads}-threads-{direct}"
        run_cache_targets(config(url, images, f"cache.store={store}", "cache.feat_dtype=int8",
                                 "cache.attn_dtype=uint8", f"cache.writer_threads={threads}",
                                 f"cache.direct_io={direct}"))
        runs[threads, direct] = file_bytes(url)
    assert runs[1, "true"] == runs[3, "true"] == runs[1, "false"]
    assert len(runs[1, "true"]) >= 6  # data files, zarr.json and completion markers


def test_compute_dtype_auto_is_fp16_on_cuda_and_fp32_on_cpu():
    import torch

    from tec_pipeline.base_targets import compute_dtype, compute_setting

    assert compute_setting("auto", torch.device("cuda")) == "fp16" and compute_setting("auto", torch.device("cpu")) == "fp32"
    assert compute_setting("bf16", torch.device("cpu")) == "bf16" and compute_dtype("fp16") == torch.float16
    assert compute_dtype("fp32") is None


def overflowing_base(path: Path) -> Path:
    """A tiny random base whose MLPs are scaled until their outputs (~7e5) pass float16's 65504,
    while float32 holds them."""
    import torch

    from tec_pipeline.config import ViTArch
    from tec_pipeline.models.base import build_vit

    torch.manual_seed(0)
    vit = build_vit(ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    with torch.no_grad():
        for block in vit.blocks:
            block.mlp.fc1.weight.mul_(300)
            block.mlp.fc2.weight.mul_(30000)
    torch.save({"model": vit.state_dict()}, path)
    return path


def test_fp16_overflow_stops_the_run_naming_the_setting(images, tmp_path):
    import torch

    from tec_pipeline.base_targets import load_base, view_targets
    from tec_pipeline.cache.store import CacheMismatchError
    from tec_pipeline.config import ViTArch

    ckpt = overflowing_base(tmp_path / "hot.pth")
    base = load_base(ViTArch("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=2, num_heads=2), str(ckpt), 32, 0)
    views = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    assert not torch.isfinite(view_targets(base, views, 2, 3, cpu, torch.float16)["feat"]).all()
    assert all(torch.isfinite(t).all() for t in view_targets(base, views, 2, 3, cpu, None).values())

    url, hot = tmp_path / "hot.zarr", [f"base.checkpoint={ckpt}", "cache.feat_dtype=float32", "cache.attn_dtype=float32"]
    with pytest.raises(UserError) as err:
        run_cache_targets(config(url, images, *hot, "base.compute_dtype=fp16"))
    message = str(err.value)
    assert "of image 0 has non-finite values" in message and "\n" not in message
    assert "the base overflowed in base.compute_dtype=fp16: set base.compute_dtype=bf16 or fp32" in message
    assert open_cache(str(url)).missing_shards() == [0, 1, 2]  # nothing of that shard is marked done
    # the precision is part of the cache's identity: a cache made in fp16 is not resumed in fp32
    with pytest.raises(CacheMismatchError, match="made with base.compute_dtype=fp16, this run has fp32"):
        run_cache_targets(config(url, images, *hot, "base.compute_dtype=fp32"))
    # finite in fp32, but its feature means (~1e5) do not fit the default float16 storage: refused too
    with pytest.raises(UserError, match=r"'feat_mean' exceeds the float16 range \(\|x\| > 65504\): set cache.feat_dtype=float32"):
        run_cache_targets(config(url, images, f"base.checkpoint={ckpt}", "base.compute_dtype=fp32"), overwrite=True)
    run_cache_targets(config(url, images, *hot, "base.compute_dtype=fp32"), overwrite=True)
    data = arrays(url)
    assert all(np.isfinite(data[k]).all() for k in ("feat", "feat_mean", "feat_std", "attn"))
    assert verify_cache(str(url), sample=3)


def test_verify_recomputes_in_the_cache_precision(images, tmp_path, capsys):
    """A bf16 cache (float32 storage) recomputed by verify, in bf16, matches far closer than a
    recomputation in fp32 would."""
    import torch

    from tec_pipeline.base_targets import load_base
    from tec_pipeline.cache.fidelity import feat_rel_rms
    from tec_pipeline.config import ViTArch
    from tec_pipeline.data.sources import ImageFolderSource
    from tec_pipeline.cache_targets import verify
    from tec_pipeline.views import draw_view

    url = tmp_path / "bf16.zarr"
    run_cache_targets(config(url, images, "base.compute_dtype=bf16", "cache.feat_dtype=float32",
                             "cache.attn_dtype=float32"))
    reader = open_cache(str(url))
    assert reader.meta["compute_dtype"] == "bfloat16" and reader.meta["identity"]["base"]["compute_dtype"] == "bf16"
    capsys.readouterr()
    assert verify_cache(str(url), sample=4)
    errors = [float(line.split("feat rel-rms ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("ok ")]
    vit = load_base(ViTArch(**reader.meta["base"]["arch"]), None, 32, 0)
    pixels, _ = draw_view(ImageFolderSource(images).load(0), 0, 0, 0, 32, (0.2, 1.0))
    stored = reader.read_view(0, 0)
    fp32 = verify.reference_view(vit, pixels[None], {**reader.meta, "compute_dtype": "float32"}, stored["topk_idx"],
                                 torch.device("cpu"))
    assert len(errors) == 4 and max(errors) < 0.1 * feat_rel_rms(fp32["feat"], stored["feat"])


# ----------------------------------------------------------------------------- a full disk


def footprint(url) -> int:
    """Bytes a cache takes on a filesystem of 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in Path(url).rglob("*") if p.is_file())


def test_a_full_disk_stops_with_one_line_and_the_rerun_writes_the_same_bytes(images, tmp_path):
    from typer.testing import CliRunner

    from tec_pipeline.cli import app

    whole = tmp_path / "whole.zarr"
    run_cache_targets(config(whole, images))
    with small_filesystem(tmp_path / "small", "1m") as disk:
        url = disk / "c.zarr"
        filler = fill_to(disk, footprint(whole) // 2)  # room for about half of the cache
        # One writer thread: which write meets the full disk first (a shard's data or its marker)
        # is then the same on every run.
        result = CliRunner().invoke(app, ["cache-targets", *overrides(url, images), "cache.writer_threads=1"])
        line = result.output.strip().splitlines()[-1]
        assert result.exit_code == 2 and line.startswith("error: shard ") and "cannot write the cache file" in line
        assert f"{url}/" in line and "No space left on device" in line and "free there)" in line
        reader = open_cache(str(url))
        done = [s for s in range(reader.num_shards) if s not in reader.missing_shards()]
        assert 0 < len(done) < reader.num_shards and not list(url.rglob("*.tmp-*"))
        for shard in done:  # the complete shards are valid
            assert_same(reader.read_shard(shard), open_cache(str(whole)).read_shard(shard))
        filler.unlink()
        summary = run_cache_targets(config(url, images))
        assert 0 < summary["images"] < NUM_IMAGES and open_cache(str(url)).is_complete()
        assert file_bytes(url) == file_bytes(whole)


def test_a_full_disk_with_two_writer_threads_also_stops_with_one_line_and_resumes(images, tmp_path):
    """Two writers: which write meets the full disk first (a shard's data or another shard's
    marker) varies from run to run, so the line is held only to what every case says; the
    complete shards stay valid and the rerun writes the same bytes as an uninterrupted run."""
    from typer.testing import CliRunner

    from tec_pipeline.cli import app

    whole = tmp_path / "whole.zarr"
    run_cache_targets(config(whole, images))
    with small_filesystem(tmp_path / "small", "1m") as disk:
        url = disk / "c.zarr"
        filler = fill_to(disk, footprint(whole) // 2)
        result = CliRunner().invoke(app, ["cache-targets", *overrides(url, images), "cache.writer_threads=2"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and lines[-1].startswith("error: ") and "Traceback" not in result.output
        assert f"{url}/" in lines[-1] and "No space left on device" in lines[-1] and "free there)" in lines[-1]
        reader = open_cache(str(url))
        done = [s for s in range(reader.num_shards) if s not in reader.missing_shards()]
        assert len(done) < reader.num_shards and not list(url.rglob("*.tmp-*"))
        for shard in done:
            assert_same(reader.read_shard(shard), open_cache(str(whole)).read_shard(shard))
        filler.unlink()
        run_cache_targets(config(url, images))
        assert open_cache(str(url)).is_complete() and file_bytes(url) == file_bytes(whole)
