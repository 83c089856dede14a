"""The pq feature codec (``cache.feat_dtype=pq``): its math against a slow float64 reference, the
fit's determinism, and stage one end to end on a tiny base (ViT dim 32, patch 8, 32 px images,
M = 8 sub-vectors): the parts stored where zarr reads them, in the cache's identity, reused by a
resumed run, decoded for training, audited by inspect and verify."""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from helpers import run_as_ranks
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.cache import codecs, fidelity
from tec_pipeline.cache.inspect import describe_cache
from tec_pipeline.cache.pq import CENTROIDS, fit_pq
from tec_pipeline.cache.pq_parts import write_parts
from tec_pipeline.cache.schema import CacheCorruptError, CacheMismatchError
from tec_pipeline.cache.store import create_cache, open_cache
from tec_pipeline.cache.storage import fs_root
from tec_pipeline.config import load_config
from tec_pipeline.errors import UserError
from tec_pipeline.render import dali_missing
from test_cache_targets import NUM_IMAGES, REPO, arrays, assert_same, config, file_bytes, overrides

M = 8
PQ = ("cache.feat_dtype=pq", f"cache.pq_subvectors={M}", "cache.attn_dtype=uint8")


def features(n: int, L: int = 16, C: int = 32, seed: int = 0) -> torch.Tensor:
    """Correlated, patch-normalized features (n, L, C): a few strong directions, as Yf has."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g) * torch.logspace(0, -1.5, C)[:, None]
    y = torch.randn(n, L, C, generator=g) @ mix
    return (y - y.mean(1, keepdim=True)) / y.std(1, keepdim=True)


# ----------------------------------------------------------------------------- the codec's math


def test_encode_picks_the_nearest_centroid_and_decode_matches_float64():
    """Against the definitions in float64: ``z = x R``, ``c_m = argmin_k |z[m::M] - Q[m, k]|``,
    ``x̂ = ẑ Rᵀ``; a code may differ from float64's only at a near-tie."""
    codec = fit_pq(features(24), M)
    x = features(6, seed=1)
    codes = codec.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (6, 16, M)
    R, Q = codec.rotation.double(), codec.codebooks.double()
    np.testing.assert_allclose((R.T @ R).numpy(), np.eye(32), atol=1e-6)  # an orthonormal basis
    z = (x.double() @ R).reshape(-1, 32 // M, M)  # (patches, d, M): sub-vector m is z[:, :, m]
    for m in range(M):
        dist = ((z[:, None, :, m] - Q[m][None]) ** 2).sum(-1)  # (patches, 256)
        chosen = dist.gather(1, codes.reshape(-1, M)[:, m:m + 1].long())[:, 0]
        assert (chosen - dist.min(1).values <= 1e-4 * (1 + dist.min(1).values)).all()
    ref = torch.stack([Q[m][codes.reshape(-1, M)[:, m].long()] for m in range(M)], -1).flatten(1) @ R.T
    np.testing.assert_allclose(codec.decode(codes).reshape(-1, 32).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert fidelity.feat_rel_rms(x, codec.decode(codes)) < 0.6  # coarse, but a fitted code, not noise


def test_the_fit_is_deterministic_and_its_digest_names_its_parts():
    feat = features(24)
    a, b, other = fit_pq(feat, M), fit_pq(feat, M), fit_pq(feat, M, seed=1)
    assert a.codebooks.shape == (M, CENTROIDS, 32 // M)
    assert all(np.array_equal(a.arrays()[k], b.arrays()[k]) for k in a.arrays()) and a.sha256() == b.sha256()
    assert torch.equal(a.encode(feat), b.encode(feat))  # same parts, same bytes
    assert other.sha256() != a.sha256()


@pytest.mark.parametrize("m", [5, 64, 0])
def test_a_sub_vector_count_that_does_not_split_the_channels_is_one_line(m):
    with pytest.raises(UserError, match=f"cache.pq_subvectors={m}: must divide the base's feature width 32") as err:
        fit_pq(features(2), m)
    assert "\n" not in str(err.value)


def test_error_stats_report_the_mean_cosine():
    ref = features(2)
    approx = ref.clone()
    approx[0, 0] = -approx[0, 0]  # one of 32 patches opposite: mean cosine (31 - 1) / 32
    sums = torch.stack([*fidelity.feat_error_sums(ref, approx), torch.zeros(2), torch.zeros(2),
                        *fidelity.feat_cosine_sums(ref, approx)], -1)
    stats = fidelity.error_stats(sums.numpy(), "pq", "uint8")
    assert stats["feat_cosine"] == pytest.approx(30 / 32) and stats["feat_patches"] == 32
    assert fidelity.aggregate_errors([stats, stats])["feat_cosine"] == pytest.approx(30 / 32)
    assert fidelity.error_stats(sums.numpy(), "float32", "uint8")["feat_cosine"] == 1.0  # exact storage


# ----------------------------------------------------------------------------- stage one


@pytest.fixture(scope="module")
def pq_cache(images, tmp_path_factory):
    url = tmp_path_factory.mktemp("pq") / "ref.zarr"
    run_cache_targets(config(url, images, *PQ))
    return url


def test_zarr_reads_the_codes_and_the_parts_and_the_identity_holds_their_digest(pq_cache):
    group = zarr.open_group(str(pq_cache), mode="r")
    assert group["feat"].dtype == np.uint8 and group["feat"].shape == (NUM_IMAGES, 2, 16, M)
    rotation, codebooks = group["feat_codec/rotation"][...], group["feat_codec/codebooks"][...]
    assert rotation.shape == (32, 32) and codebooks.shape == (M, CENTROIDS, 32 // M)
    reader = open_cache(str(pq_cache))
    digest = reader.meta["identity"]["cache"]["pq_parts_sha256"]
    assert reader.feat_codec.sha256() == digest == group["feat_codec"].attrs["sha256"]
    decoded = reader.read_shard(0)["feat"]
    assert decoded.shape == (4, 2, 16, 32) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, reader.feat_codec.decode(torch.from_numpy(group["feat"][:4])).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_training_decodes_the_codes_on_the_device_from_compact_batches(pq_cache):
    reader = open_cache(str(pq_cache))
    got = reader.open_shard(1).take(np.array([0, 3]), np.array([1, 0]), 2)
    assert got["feat"].dtype == np.uint8 and got["feat"].shape == (2, 16, M)  # the loader moves codes
    t = codecs.decode_batch({k: torch.from_numpy(v) for k, v in got.items()}, "cpu", reader.feat_codec)
    want = reader.read_shard(1)["feat"][[0, 3], [1, 0]]
    np.testing.assert_allclose(t.feat.numpy(), want, rtol=1e-5, atol=1e-5)


def test_other_parts_change_the_identity_and_damaged_parts_are_refused(pq_cache, images, tmp_path):
    reader = open_cache(str(pq_cache))
    meta = reader.meta
    other = fit_pq(torch.from_numpy(reader.read_shard(1)["feat"]), M)
    changed = {**meta, "identity": {**meta["identity"], "cache": {**meta["identity"]["cache"],
                                                                  "pq_parts_sha256": other.sha256()}}}
    with pytest.raises(CacheMismatchError, match="cache.pq_parts_sha256="):
        create_cache(str(pq_cache), changed)
    copy = tmp_path / "copy.zarr"
    run_cache_targets(config(copy, images, *PQ))
    fs, root = fs_root(str(copy))
    write_parts(str(copy), fs, root, other)  # parts replaced behind the metadata's back
    with pytest.raises(CacheCorruptError, match="do not match the digest its identity records"):
        open_cache(str(copy))


def test_inspect_reports_the_codec_and_its_measured_error(pq_cache):
    text = describe_cache(str(pq_cache))
    assert f"feat pq ({M} sub-vectors x 256 centroids, parts feat_codec/ sha256 " in text
    quant = open_cache(str(pq_cache)).summary["quantization"]
    assert 0 < quant["feat_rel_rms"] < 1 and 0 < quant["feat_cosine"] < 1 and quant["attn_kl"] > 0
    assert f"feat relative RMS {100 * quant['feat_rel_rms']:.2f}%, mean cosine {quant['feat_cosine']:.4f}" in text


def test_verify_passes_and_catches_a_damaged_chunk_of_codes(pq_cache, images, tmp_path, capsys):
    url = tmp_path / "v.zarr"
    run_cache_targets(config(url, images, *PQ))
    assert verify_cache(str(url), sample=6)
    codes = url / "feat" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(codes.read_bytes())
    raw[10:30] = bytes(20)
    codes.write_bytes(bytes(raw))
    capsys.readouterr()
    assert not verify_cache(str(url), sample=2 * NUM_IMAGES)
    assert any(line.startswith("FAIL") and "shard 1" in line for line in capsys.readouterr().out.splitlines())


def test_webdataset_store_holds_the_same_codes(pq_cache, images):
    url = "memory://pq-wds"
    run_cache_targets(config(url, images, *PQ, "cache.store=webdataset"))
    reader = open_cache(url)
    assert reader.feat_codec.sha256() == open_cache(str(pq_cache)).feat_codec.sha256()
    assert_same(arrays(url), arrays(pq_cache))


@pytest.mark.skipif(dali_missing() is not None and platform.machine() != "x86_64", reason="no DALI wheel here")
def test_a_dali_rendered_cache_fits_its_parts_on_dali_views(pq_cache, images, tmp_path):
    """The parts are fitted on the views as the cache renders them (here DALI's, on the CPU)."""
    url = tmp_path / "dali.zarr"
    run_cache_targets(config(url, images, *PQ, "data.loader=dali"))
    reader = open_cache(str(url))
    assert reader.is_complete() and reader.feat_codec.sha256() != open_cache(str(pq_cache)).feat_codec.sha256()
    assert verify_cache(str(url), sample=4)


def test_sigkill_mid_run_then_rerun_reuses_the_parts_and_writes_the_same_bytes(pq_cache, images, tmp_path):
    url = tmp_path / "killed.zarr"
    slow_writes = ("import time; from tec_pipeline.cache import writer; w = writer.CacheWriter.write_encoded_shard; "
                   "writer.CacheWriter.write_encoded_shard = lambda *a, **k: (w(*a, **k), time.sleep(1.0))[0]; "
                   "from tec_pipeline.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", slow_writes, "cache-targets", *overrides(url, images, *PQ)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (url / "_done" / "shard-00000.json").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not open_cache(str(url)).is_complete()
    parts = {p: p.stat().st_mtime_ns for p in (url / "feat_codec").rglob("*") if p.is_file()}
    summary = run_cache_targets(config(url, images, *PQ))
    assert 0 < summary["images"] < NUM_IMAGES  # completed shards were skipped
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # the stored parts were reused, not fitted again
    assert file_bytes(url) == file_bytes(pq_cache)


def test_two_processes_share_the_parts_process_0_fitted(pq_cache, images, tmp_path):
    url = tmp_path / "two.zarr"
    assert run_as_ranks(run_cache_targets, load_config(None, overrides(url, images, *PQ)), timeout=120) == [0, 0]
    assert open_cache(str(url)).doc["summary"]["processes"] == 2
    assert file_bytes(url) == file_bytes(pq_cache)


def test_a_dry_run_fits_on_its_batch_and_writes_nothing(pq_cache, images, tmp_path):
    url = tmp_path / "dry.zarr"
    est = run_cache_targets(config(url, images, *PQ), dry_run=True)
    assert 0 < est["bytes_per_view"] < open_cache(str(pq_cache)).summary["bytes_per_view"] * 2
    assert not url.exists()


def test_pq_settings_are_one_line_errors(images, tmp_path):
    for extra, message in ((("cache.feat_dtype=pq",), "cache.feat_dtype=pq needs cache.pq_subvectors"),
                           (("cache.feat_dtype=pq", "cache.pq_subvectors=12"), "cache.pq_subvectors=12: must divide"),
                           (("cache.feat_dtype=pq", "cache.pq_subvectors=64"), "cache.pq_subvectors=64: must divide")):
        with pytest.raises(UserError, match=message) as err:
            run_cache_targets(config(tmp_path / "bad.zarr", images, *extra))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "bad.zarr").exists()
