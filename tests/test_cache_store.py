"""The cache storage layer: round trips, lossy error bounds, resume, identity, corruption, determinism."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid

import fsspec
import numpy as np
import pytest

from tec_pipeline.cache import CacheCorruptError, CacheMismatchError, create_cache, open_cache
from tec_pipeline.cache.fidelity import attn_kl_rows
from tec_pipeline.cache.inspect import describe_cache
from tec_pipeline.errors import UserError

N, V, L, C, H, K, S = 5, 2, 16, 8, 2, 3, 2  # 5 images in shards of 2 -> shards of 2, 2, 1 images
STORES = ("zarr", "webdataset")
COMPRESS = ("zstd", "lz4", "none")


def make_meta(store: str, feat_dtype: str = "float32", attn_dtype: str = "float32", compress: str = "zstd",
              **identity) -> dict:
    ident = {"base": {"arch": "vit_tiny", "checkpoint_sha256": "ab" * 32}, "seed": 0, "img_size": 64}
    ident.update(identity)
    return dict(store=store, num_images=N, views=V, num_patches=L, feat_dim=C, heads=H, k_max=K,
                images_per_shard=S, feat_dtype=feat_dtype, attn_dtype=attn_dtype, compress=compress, zstd_level=1,
                store_images=store == "webdataset", identity=ident)


def make_targets(seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic-ish targets: patch-normalized features (one outlier channel), logits std 2.5."""
    r = np.random.default_rng(seed)
    y = r.normal(size=(N, V, L, C))
    y[..., 3] *= 40.0  # an outlier channel: the per-channel step must absorb it
    feat = (y - y.mean(axis=2, keepdims=True)) / y.std(axis=2, ddof=1, keepdims=True)
    attn = 2.5 * r.normal(size=(N, V, K + 1, H, L))
    attn[0, 0, 0, 0, 0] = -100.0  # far below its row max: uint8 must clip, not wrap
    return {"crop": r.integers(0, 200, (N, V, 5)).astype(np.int32),
            "feat": feat.astype(np.float32),
            "feat_mean": r.normal(size=(N, V, C)).astype(np.float32),
            "feat_std": r.uniform(0.5, 2.0, (N, V, C)).astype(np.float32),
            "attn": attn.astype(np.float32),
            "topk_idx": np.argsort(-r.random((N, V, L)), axis=-1)[..., :K],
            "valid": np.ones(N, np.uint8),
            "label": r.integers(0, 10, N)}


def fake_image(i: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes([i]) * 10


def write_shards(writer, data, shards=None) -> list[dict]:
    stats = []
    for s in range(writer.num_shards) if shards is None else shards:
        r = writer.shard_range(s)
        images = [fake_image(i) for i in r] if writer.meta["store_images"] else None
        stats.append(writer.write_shard(s, {k: v[r.start:r.stop] for k, v in data.items()}, images))
    return stats


def read_all(reader) -> dict[str, np.ndarray]:
    parts = [reader.read_shard(s) for s in range(reader.num_shards)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(params=["local", "memory"])
def url_for(request, tmp_path):
    """A fresh cache URL maker: a local directory or a memory:// URL."""
    made = []

    def make(name: str = "c") -> str:
        if request.param == "local":
            return str(tmp_path / f"{name}-{len(made)}")
        url = f"memory://tec-test-{uuid.uuid4().hex}/{name}"
        made.append(url)
        return url

    yield make
    for url in made:
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def file_hashes(url: str) -> dict[str, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root):]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("store", STORES)
def test_float32_round_trip_is_exact_and_read_view_matches(store, url_for):
    url = url_for()
    data = make_targets()
    writer = create_cache(url, make_meta(store))
    stats = write_shards(writer, data)
    assert [s["feat_rel_rms"] for s in stats] == [0.0] * 3 and all(s["bytes"] > 0 for s in stats)
    writer.finalize({"skipped_files": []})

    reader = open_cache(url)
    assert reader.is_complete() and reader.missing_shards() == [] and reader.num_shards == 3
    got = read_all(reader)
    for key, ref in data.items():
        assert got[key].shape == ref.shape, key
        np.testing.assert_array_equal(got[key], ref, err_msg=key)
    assert got["feat"].dtype == np.float32 and got["topk_idx"].dtype == np.int64 and got["crop"].dtype == np.int32
    for image in (0, 3, 4, 2):  # random access, out of order, across shards
        for view in range(V):
            one = reader.read_view(image, view)
            for key in data:
                ref = got[key][image] if key in ("valid", "label") else got[key][image, view]
                np.testing.assert_array_equal(one[key], ref, err_msg=f"{key} image {image} view {view}")
    assert reader.nbytes() > 0
    if store == "webdataset":
        assert reader.image_bytes(3) == fake_image(3)
    # readers travel to DataLoader workers (spawn): caches stay behind, reads still work
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read_view(4, 1)["attn"], got["attn"][4, 1])
    # finalize on a complete cache changes nothing
    before = file_hashes(url)
    create_cache(url, make_meta(store)).finalize({"other": 1})
    assert file_hashes(url) == before


@pytest.mark.filterwarnings("ignore:Object at:UserWarning")  # tec_cache.json and _done/ beside the arrays
@pytest.mark.parametrize("compress", COMPRESS)
def test_zarr_store_is_readable_by_zarr_itself(tmp_path, compress):
    """Our direct shard reader and zarr agree: the group stays a plain zarr v3 group, whatever
    the chunks' codec (``cache.compress``)."""
    import zarr

    url = str(tmp_path / "c")
    data = make_targets()
    write_shards(create_cache(url, make_meta("zarr", "int8", "uint8", compress)), data)
    ours = open_cache(url)
    enc = {k: np.concatenate([ours._read_encoded(s)[k] for s in range(3)]) for k in ours._layouts}
    group = zarr.open_group(url, mode="r")
    assert sorted(group.array_keys()) == sorted(enc)
    for name, arr in enc.items():
        np.testing.assert_array_equal(group[name][:], arr, err_msg=name)
    assert group["feat"].dtype == np.int8 and group["attn"].dtype == np.uint8
    codecs = [c["name"] for c in json.loads((tmp_path / "c" / "feat" / "zarr.json").read_text())["codecs"][0]
              ["configuration"]["codecs"]]
    assert codecs == {"zstd": ["bytes", "zstd"], "lz4": ["bytes", "blosc", "crc32c"], "none": ["bytes", "crc32c"]}[compress]


@pytest.mark.parametrize("compress", ["lz4", "none"])
@pytest.mark.parametrize("feat_dtype, attn_dtype", [("int8", "uint8"), ("float16", "float16"), ("float32", "float32")])
def test_each_compress_setting_stores_the_same_values_bit_for_bit(tmp_path, compress, feat_dtype, attn_dtype):
    """lz4 and none hold exactly what zstd holds, by shard and by view, in every storage dtype."""
    data, got = make_targets(), {}
    for setting in ("zstd", compress):
        url = str(tmp_path / setting)
        write_shards(create_cache(url, make_meta("zarr", feat_dtype, attn_dtype, setting)), data)
        reader = open_cache(url)
        got[setting] = {s: reader._read_encoded(s) for s in range(reader.num_shards)}
        got[setting]["view"] = reader.read_view(3, 1)
    assert got["zstd"].keys() == got[compress].keys()
    for part, arrays in got["zstd"].items():
        for name, ref in arrays.items():
            assert got[compress][part][name].dtype == ref.dtype, name
            assert got[compress][part][name].tobytes() == ref.tobytes(), f"{name} of {part}"
    if compress == "none":  # stored as they are: each chunk's bytes and a 4-byte crc32c, then the index
        size = os.path.getsize(tmp_path / "none" / "feat" / "c" / "0" / "0" / "0" / "0")
        assert size == S * V * (L * C * np.dtype(feat_dtype).itemsize + 4) + S * V * 16 + 4


def test_a_cache_from_before_cache_compress_is_zstd(tmp_path):
    """A cache whose metadata has no ``compress`` key reads and resumes as zstd."""
    url = str(tmp_path / "c")
    write_shards(create_cache(url, make_meta("zarr", "int8", "uint8")), make_targets(), shards=[0])
    doc = json.loads((tmp_path / "c" / "tec_cache.json").read_text())
    del doc["meta"]["compress"]
    (tmp_path / "c" / "tec_cache.json").write_text(json.dumps(doc))
    assert open_cache(url).meta["compress"] == "zstd" and open_cache(url).read_shard(0)["feat"].any()
    assert create_cache(url, make_meta("zarr", "int8", "uint8")).is_done(0)
    with pytest.raises(CacheMismatchError, match="cache.compress=zstd, this run has lz4"):
        create_cache(url, make_meta("zarr", "int8", "uint8", "lz4"))


# ----------------------------------------------------------------------------- lossy dtypes


def int8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: step = max(1/16, absmax_c / 127) as stored (float16), clip to +-127."""
    x = x.astype(np.float64)
    step = np.maximum(1 / 16, np.abs(x).max(axis=-2) / 127).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint(x / step[..., None, :]), -127, 127)
    return q * step[..., None, :], step


def uint8_reference(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    u = np.clip(np.rint((a.max(axis=-1, keepdims=True) - a) / 0.1), 0, 255)
    return -0.1 * u


@pytest.mark.parametrize("store", STORES)
def test_int8_feat_and_uint8_attn_within_tolerance(store, tmp_path):
    url = str(tmp_path / "c")
    data = make_targets()
    writer = create_cache(url, make_meta(store, "int8", "uint8"))
    stats = write_shards(writer, data)
    writer.finalize({})
    got = read_all(open_cache(url))

    ref_feat, step = int8_reference(data["feat"])
    diff = np.abs(got["feat"] - ref_feat)
    assert (diff <= step[..., None, :] + 1e-6).all()  # at most one step off (float32 rounding at ties)
    assert (diff < 1e-6).mean() > 0.999
    assert (np.abs(got["feat"] - data["feat"]) <= step[..., None, :] / 2 + 1e-5).all()  # nothing clipped or wrapped
    rel_rms = np.sqrt(((got["feat"] - data["feat"].astype(np.float64)) ** 2).sum() / (data["feat"] ** 2).sum())
    assert rel_rms <= 0.02

    ref_attn = uint8_reference(data["attn"])
    assert (np.abs(got["attn"] - ref_attn) <= 0.1 + 1e-5).all() and (np.abs(got["attn"] - ref_attn) < 1e-5).mean() > 0.999
    assert got["attn"][0, 0, 0, 0, 0] == pytest.approx(-25.5)  # clipped at 255 steps, not wrapped
    kl = float(attn_kl_rows(data["attn"], got["attn"]).mean())
    assert kl <= 1e-3

    # mean/std go float16 when features are lossy; exact otherwise
    np.testing.assert_array_equal(got["feat_std"], data["feat_std"].astype(np.float16).astype(np.float32))

    # the recorded error is the measured one (all views are sampled at this size)
    summary = open_cache(url).doc["summary"]["quantization"]
    assert summary["feat_rel_rms"] == pytest.approx(rel_rms, rel=1e-3)
    assert summary["attn_kl"] == pytest.approx(kl, rel=1e-3)
    assert all(0 < s["feat_rel_rms"] <= 0.025 and 0 < s["attn_kl"] <= 1e-3 for s in stats)


def test_float16_storage_is_exact_to_float16(tmp_path):
    url = str(tmp_path / "c")
    data = make_targets()
    write_shards(create_cache(url, make_meta("zarr", "float16", "float16")), data)
    got = read_all(open_cache(url))
    for key in ("feat", "feat_mean", "feat_std", "attn"):
        np.testing.assert_array_equal(got[key], data[key].astype(np.float16).astype(np.float32), err_msg=key)


# ----------------------------------------------------------------------------- resume, identity


@pytest.mark.parametrize("store", STORES)
def test_resume_keeps_done_shards_and_gives_the_same_bytes(store, url_for):
    data = make_targets()
    whole = url_for("whole")
    w = create_cache(whole, make_meta(store, "int8", "uint8"))
    write_shards(w, data)
    w.finalize({})

    url = url_for("resumed")
    first = create_cache(url, make_meta(store, "int8", "uint8"))
    write_shards(first, data, shards=[0, 2])
    # a crashed attempt at shard 1 left a half-written file behind
    fs, root = fsspec.core.url_to_fs(url)
    junk = f"{root}/feat/c/1/0/0/0" if store == "zarr" else f"{root}/shard-00001-000.tar"
    fs.makedirs(junk.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(junk, b"half written")

    with pytest.raises(UserError, match="1 of 3 shards are not written"):
        first.finalize({})
    reader = open_cache(url)
    assert not reader.is_complete() and reader.missing_shards() == [1]
    with pytest.raises(CacheCorruptError, match="shard 1 is not written"):
        reader.read_shard(1)
    np.testing.assert_array_equal(reader.read_shard(2)["label"], data["label"][4:])  # done shards readable

    resumed = create_cache(url, make_meta(store, "int8", "uint8"))  # same identity: reopen
    assert [resumed.is_done(s) for s in range(3)] == [True, False, True]
    with pytest.raises(ValueError, match="already complete"):
        write_shards(resumed, data, shards=[0])
    write_shards(resumed, data, shards=[1])
    resumed.finalize({})
    assert open_cache(url).is_complete()
    assert file_hashes(url) == file_hashes(whole)  # same bytes as an uninterrupted run


def test_identity_mismatch_names_the_key(tmp_path):
    url = str(tmp_path / "c")
    write_shards(create_cache(url, make_meta("zarr")), make_targets(), shards=[0])
    other = make_meta("zarr", base={"arch": "vit_tiny", "checkpoint_sha256": "cd" * 32})
    with pytest.raises(CacheMismatchError) as err:
        create_cache(url, other)
    msg = str(err.value)
    assert "base.checkpoint_sha256=abababababab.." in msg and "this run has cdcdcdcdcdcd.." in msg
    assert "--overwrite" in msg and "\n" not in msg
    layout = make_meta("zarr")
    layout["images_per_shard"] = 3
    with pytest.raises(CacheMismatchError, match="cache.images_per_shard=2, this run has 3"):
        create_cache(url, layout)
    with pytest.raises(CacheMismatchError, match=r"^cache .* was made with cache.compress=zstd, this run has none;[^\n]*$"):
        create_cache(url, make_meta("zarr", compress="none"))
    assert open_cache(url).missing_shards() == [1, 2]  # refusing touched nothing


@pytest.mark.parametrize("store", STORES)
def test_overwrite_replaces_the_cache(store, url_for):
    url = url_for()
    write_shards(create_cache(url, make_meta(store)), make_targets())
    writer = create_cache(url, make_meta(store, seed=1), overwrite=True)
    assert not any(writer.is_done(s) for s in range(3))
    reader = open_cache(url)
    assert reader.meta["identity"]["seed"] == 1 and reader.missing_shards() == [0, 1, 2]


def test_a_directory_that_is_not_a_cache_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="not a tec-pipeline cache"):
        create_cache(str(tmp_path / "c"), make_meta("zarr"))
    with pytest.raises(UserError, match="not a tec-pipeline cache"):
        open_cache(str(tmp_path / "c"))


# ----------------------------------------------------------------------------- damage


def _flip_byte(fs, path: str, pos: int) -> None:
    data = bytearray(fs.cat_file(path))
    data[pos] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def _finished_cache(tmp_path, store: str, compress: str = "zstd"):
    """A complete int8/uint8 cache on local disk: (url, its fsspec filesystem, root path)."""
    url = str(tmp_path / "c")
    w = create_cache(url, make_meta(store, "int8", "uint8", compress))
    write_shards(w, make_targets())
    w.finalize({})
    return (url, *fsspec.core.url_to_fs(url))


@pytest.mark.parametrize("compress", COMPRESS)
@pytest.mark.parametrize("damage", ["chunk", "index", "missing"])
def test_zarr_damage_is_detected_and_names_the_shard(damage, compress, tmp_path):
    url, fs, root = _finished_cache(tmp_path, "zarr", compress)
    path = f"{root}/attn/c/1/0/0/0/0"
    if damage == "chunk":
        _flip_byte(fs, path, 20)
    elif damage == "index":
        _flip_byte(fs, path, fs.size(path) - 10)
    else:
        fs.rm(path)
    reads = (lambda r: r.read_shard(1), lambda r: r.read_view(2, 0),  # image 2 view 0: the first chunk
             lambda r: r.open_shard(1).take(np.array([0]), np.array([0]), K + 1))  # training: same chunk
    for read in reads:
        with pytest.raises(CacheCorruptError, match="shard 1"):
            read(open_cache(url))
    open_cache(url).read_shard(0)  # other shards are fine
    if damage == "chunk":  # read_view and a batch touch only their own chunks
        open_cache(url).read_view(3, 1)
        open_cache(url).open_shard(1).take(np.array([1, 0]), np.array([1, 1]), K + 1)


@pytest.mark.parametrize("compress", COMPRESS)
def test_zarr_damaged_small_chunk_is_named(tmp_path, compress):
    """Back-to-back chunks are decoded in one zstd call; a damaged one is still found and named,
    whole-shard (``read_shard``) and when training takes the view (lz4 / none: by its crc32c)."""
    url, fs, root = _finished_cache(tmp_path, "zarr", compress)
    _flip_byte(fs, f"{root}/feat_mean/c/1/0/0", 20 if compress == "zstd" else 5)  # inside the first chunk (20 bytes with none)
    for read in (lambda r: r.read_shard(1), lambda r: r.open_shard(1).take(np.array([0]), np.array([0]), K + 1)):
        with pytest.raises(CacheCorruptError, match=r"shard 1: 'feat_mean' chunk \(0, 0\)"):
            read(open_cache(url))


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("feat_dtype, attn_dtype", [("int8", "uint8"), ("float16", "float16"),
                                                    ("float32", "float32"), ("int8", "float16")])
def test_open_shard_keeps_stored_dtypes_and_dequantizes_bit_identically(store, feat_dtype, attn_dtype, tmp_path):
    """Training's compact path (``open_shard`` + ``codecs.decode_targets``) gives the float32
    values of ``read_shard`` bit for bit, for every storage dtype and attention-row prefix."""
    import torch

    from tec_pipeline.cache.codecs import decode_targets

    url = str(tmp_path / "c")
    w = create_cache(url, make_meta(store, feat_dtype, attn_dtype))
    write_shards(w, make_targets())
    w.finalize({})
    reader = open_cache(url)
    bits = lambda a: np.ascontiguousarray(a).view(np.uint32)  # noqa: E731
    for shard in range(reader.num_shards):
        ref = reader.read_shard(shard)
        n = len(reader.shard_range(shard))
        local, views = np.repeat(np.arange(n), V)[::-1].copy(), np.tile(np.arange(V), n)[::-1].copy()
        for rows in (K + 1, 2, 1):
            got = reader.open_shard(shard).take(local, views, rows)
            assert got["feat"].dtype == {"int8": np.int8, "float16": np.float16, "float32": np.float32}[feat_dtype]
            assert got["attn"].dtype == {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}[attn_dtype]
            t = decode_targets(**{k: torch.from_numpy(v) for k, v in got.items() if k != "crop"})
            for name in ("feat", "feat_mean", "feat_std", "attn"):
                want = ref[name][local, views]
                want = want[:, :rows] if name == "attn" else want
                assert getattr(t, name).dtype == torch.float32, name
                np.testing.assert_array_equal(bits(getattr(t, name).numpy()), bits(want), err_msg=name)
            np.testing.assert_array_equal(t.topk_idx.numpy(), ref["topk_idx"][local, views, :rows - 1])
            assert t.topk_idx.dtype == torch.int64
            np.testing.assert_array_equal(got["crop"], ref["crop"][local, views])


@pytest.mark.parametrize("damage", ["member", "missing"])
def test_webdataset_damage_is_detected_and_names_the_shard(damage, tmp_path):
    url, fs, root = _finished_cache(tmp_path, "webdataset")
    path = f"{root}/shard-00001-v00-000.tar"  # view 0 of shard 1's images
    if damage == "member":
        _flip_byte(fs, path, 512 + 40)  # inside the first member's zstd frame
    else:
        fs.rm(path)
    reads = (lambda r: r.read_shard(1), lambda r: r.read_view(2, 0),
             lambda r: r.open_shard(1).take(np.array([0]), np.array([0]), K + 1))
    for read in reads:
        with pytest.raises(CacheCorruptError, match="shard 1"):
            read(open_cache(url))
    open_cache(url).read_view(2, 1)  # the other view's tars are untouched
    open_cache(url).open_shard(1).take(np.array([0, 1]), np.array([1, 1]), K + 1)


# ----------------------------------------------------------------------------- determinism, misc


@pytest.mark.parametrize("store", STORES)
def test_same_data_gives_the_same_bytes(store, tmp_path):
    hashes = []
    for name in ("a", "b"):
        url = str(tmp_path / name)
        w = create_cache(url, make_meta(store, "int8", "uint8"))
        write_shards(w, make_targets(seed=3))
        w.finalize({"note": "x"})
        hashes.append(file_hashes(url))
    assert hashes[0] == hashes[1] and len(hashes[0]) >= 4


def test_skipped_images_are_zeros_and_listed(tmp_path):
    url = str(tmp_path / "c")
    data = make_targets()
    data["valid"][3] = 0
    w = create_cache(url, make_meta("zarr", "int8", "uint8"))
    write_shards(w, data)
    w.finalize({"skipped_files": ["bad.jpg"]})
    reader = open_cache(url)
    got = reader.read_shard(1)
    assert got["valid"].tolist() == [1, 0] and not got["feat"][1].any() and not got["attn"][1].any()
    assert reader.doc["summary"]["skipped_images"] == [3]
    text = describe_cache(url)
    for needle in ("store: zarr", "shards: 3 / 3 done", "complete: yes", "skipped images: 1", "feat relative RMS",
                   "base.checkpoint_sha256", "per written view", "skipped_files"):
        assert needle in text, needle


def test_compress_other_than_zstd_needs_zarr(tmp_path):
    with pytest.raises(UserError, match=r"^cache.compress=lz4 needs cache.store=zarr \(webdataset members are zstd\)$"):
        create_cache(str(tmp_path / "c"), make_meta("webdataset", compress="lz4"))
    with pytest.raises(UserError, match="cache.compress='gzip': expected one of zstd, lz4, none"):
        create_cache(str(tmp_path / "c"), make_meta("zarr", compress="gzip"))


def test_bad_input_is_refused(tmp_path):
    w = create_cache(str(tmp_path / "c"), make_meta("zarr"))
    data = {k: v[:2] for k, v in make_targets().items()}
    with pytest.raises(ValueError, match="'feat' has shape"):
        w.write_shard(0, {**data, "feat": data["feat"][:, :, :-1]})
    bad = data["attn"].copy()
    bad[1, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="'attn' of image 1 has non-finite"):
        w.write_shard(0, {**data, "attn": bad})
    with pytest.raises(UserError, match="cache.k_max=0: must be within 1..16"):
        create_cache(str(tmp_path / "d"), {**make_meta("zarr"), "k_max": 0})
    with pytest.raises(UserError, match="store_images=true needs cache.store=webdataset"):
        create_cache(str(tmp_path / "d"), {**make_meta("zarr"), "store_images": True})
    assert not w.is_done(0)


def test_webdataset_parts_stream_through_webdataset(tmp_path):
    """Size-bounded parts grouped by view: streaming one view's tars (one epoch in cycle mode)
    yields every image once, as plain webdataset samples that decode_sample reads; the source
    images sit in their own tars, stored once."""
    import webdataset as wds

    from tec_pipeline.cache.wds_format import decode_sample

    url = str(tmp_path / "c")
    meta = {**make_meta("webdataset", "int8", "uint8"), "max_part_bytes": 4096}
    w = create_cache(url, meta)
    write_shards(w, make_targets())
    w.finalize({})
    reader = open_cache(url)
    assert len(reader.tar_urls()) == N * V  # one sample per part at this limit
    got = read_all(reader)
    for view in range(V):
        urls = reader.tar_urls(view)
        assert len(urls) == N and all(f"-v{view:02d}-" in u for u in urls)
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert [int(s["__key__"]) for s in samples] == list(range(N))
        for s in samples:
            one, i = decode_sample(s, reader.meta), int(s["__key__"])
            for key in ("feat", "attn", "crop", "topk_idx"):
                np.testing.assert_array_equal(one[key], got[key][i, view], err_msg=key)
            assert "png" not in s
    assert [reader.image_bytes(i) for i in range(N)] == [fake_image(i) for i in range(N)]


def test_a_cache_of_the_old_layout_is_refused_with_how_to_rebuild(tmp_path):
    """Format 1 (views image by image in a shard) is not read as if it were format 2."""
    url, fs, root = _finished_cache(tmp_path, "zarr")
    doc = json.loads(fs.cat_file(f"{root}/tec_cache.json"))
    fs.pipe_file(f"{root}/tec_cache.json", json.dumps({**doc, "format_version": 1}).encode())
    with pytest.raises(UserError, match=r"format version 1.0, this tec-pipeline reads version 2.1 .*--overwrite"):
        open_cache(url)


def test_zarr_shard_files_are_view_major(tmp_path):
    """Within a shard file all images' view 0 come first, then view 1: an epoch's views are one run."""
    url, fs, root = _finished_cache(tmp_path, "zarr")
    reader = open_cache(url)
    index = reader._load_index("feat", 0)  # (image * V + view, 2): offset, length
    offsets = index[:, 0].reshape(S, V)
    assert (offsets[:, 0].max() < offsets[:, 1].min()) and (np.diff(offsets[:, 0]) > 0).all()
