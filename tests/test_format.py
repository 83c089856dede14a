"""The cache as a public format (docs/format.md): the format version every cache records and what a
reader does with another one; the standalone reader (examples/read_cache.py) against the library on
every store x feature codec x chunk compressor; and the spec naming everything a cache holds."""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from test_cache_store import N, V, make_meta, make_targets, write_shards
from tec_pipeline.cache import create_cache, open_cache
from tec_pipeline.cache.pq import fit_pq
from tec_pipeline.cache.schema import FORMAT_VERSION, CacheCorruptError
from tec_pipeline.cli import app
from tec_pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "read_cache.py"
PQ_SUBVECTORS = 4  # of the tests' 8 channels
PQ_ATOL = 3e-6  # pq decodes with a float32 matrix product, whose sums numpy and torch may order otherwise


def load_example():
    spec = importlib.util.spec_from_file_location("read_cache", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cache(url: Path, store: str, feat_dtype: str, attn_dtype: str, compress: str = "zstd") -> str:
    """A complete 5-image x 2-view cache written through the library (pq: parts fitted on its features)."""
    data = make_targets()
    meta = make_meta(store, feat_dtype, attn_dtype, compress)
    if feat_dtype == "pq":
        meta["pq_subvectors"] = PQ_SUBVECTORS
    writer = create_cache(str(url), meta)
    if feat_dtype == "pq":
        writer.record_feat_codec(fit_pq(torch.from_numpy(data["feat"]), PQ_SUBVECTORS))
    write_shards(writer, data)
    writer.finalize({})
    return str(url)


def set_version(url: str, version) -> None:
    path = Path(url) / "tec_cache.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": version}))


# ----------------------------------------------------------------------------- the format version


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_a_cache_records_its_version_and_reads_any_minor_of_its_major(store, tmp_path):
    url = tiny_cache(tmp_path / "c", store, "int8", "uint8")
    assert json.loads((Path(url) / "tec_cache.json").read_text())["format_version"] == FORMAT_VERSION == "2.0"
    first = open_cache(url).read_shard(1)
    for version in (2, "2.0", "2.7"):  # 2: the integer caches recorded before "MAJOR.MINOR"
        set_version(url, version)
        again = open_cache(url).read_shard(1)
        assert all(np.array_equal(first[k], again[k]) for k in first), version
        assert load_example().read_view(url, 2, 1)["crop"].tolist() == first["crop"][0, 1].tolist()


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_a_newer_major_is_refused_in_one_line_naming_both_versions(store, tmp_path):
    url = tiny_cache(tmp_path / "c", store, "float16", "float16")
    set_version(url, "3.1")
    expected = f"cache {url} has format version 3.1, newer than the 2.0 this tec-pipeline reads: upgrade tec-pipeline to read it"
    with pytest.raises(UserError) as err:
        open_cache(url)
    assert str(err.value) == expected
    with pytest.raises(UserError, match="format version 3.1, newer than the 2.0"):  # a rerun of stage one too
        create_cache(url, make_meta(store, "float16", "float16"))
    result = CliRunner().invoke(app, ["inspect", url])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {expected}"
    with pytest.raises(SystemExit, match="format version 3.1, this reader reads 2.x"):
        load_example().read_view(url, 0, 0)


@pytest.mark.parametrize("version", [1, "1.0", "1.4"])
def test_an_older_major_is_refused_by_name(version, tmp_path):
    url = tiny_cache(tmp_path / "c", "zarr", "float32", "float32")
    set_version(url, version)
    with pytest.raises(UserError, match=r"format version 1\.\d, this tec-pipeline reads version 2.0 "
                                        r"\(views laid out so an epoch reads only its own\); rebuild it .*--overwrite"):
        open_cache(url)


@pytest.mark.parametrize("version", [None, "2", "v2.0", "2.0.1", 2.0, True])
def test_a_version_that_is_not_major_minor_is_damage(version, tmp_path):
    url = tiny_cache(tmp_path / "c", "zarr", "float32", "float32")
    set_version(url, version)
    with pytest.raises(CacheCorruptError, match=rf"tec_cache.json is damaged \(format_version .* is not MAJOR.MINOR\)"):
        open_cache(url)


# ----------------------------------------------------------------------------- the standalone reader

FEAT_DTYPES = ("float32", "float16", "int8", "pq")
ATTN_DTYPES = ("float32", "float16", "uint8")
COMBINATIONS = ([("zarr", feat, ATTN_DTYPES[(i + j) % 3], compress) for i, feat in enumerate(FEAT_DTYPES)
                 for j, compress in enumerate(("zstd", "lz4", "none"))]
                + [("webdataset", feat, ATTN_DTYPES[i % 3], "zstd") for i, feat in enumerate(FEAT_DTYPES)])


def test_the_combinations_cover_every_codec_pair_and_compressor():
    assert {(f, a) for s, f, a, c in COMBINATIONS if s == "zarr"} >= {(f, a) for f in FEAT_DTYPES[:3] for a in ATTN_DTYPES}
    assert {(a, c) for s, f, a, c in COMBINATIONS if s == "zarr"} == {(a, c) for a in ATTN_DTYPES
                                                                       for c in ("zstd", "lz4", "none")}


@pytest.mark.parametrize("store, feat_dtype, attn_dtype, compress", COMBINATIONS)
def test_the_standalone_reader_matches_the_library(store, feat_dtype, attn_dtype, compress, tmp_path):
    """Every view, every field: bit-identical, except pq features within PQ_ATOL."""
    url = tiny_cache(tmp_path / "c", store, feat_dtype, attn_dtype, compress)
    reader, example = open_cache(url), load_example()
    for image in range(N):
        for view in range(V):
            ours, theirs = reader.read_view(image, view), example.read_view(url, image, view)
            assert sorted(theirs) == sorted(ours)
            for name, value in ours.items():
                assert theirs[name].dtype == value.dtype and theirs[name].shape == value.shape, name
                if name == "feat" and feat_dtype == "pq":
                    np.testing.assert_allclose(theirs[name], value, rtol=0, atol=PQ_ATOL)
                else:
                    np.testing.assert_array_equal(theirs[name], value, err_msg=f"{name} ({image}, {view})")


def test_the_standalone_reader_is_short_and_imports_no_tec_pipeline():
    source = EXAMPLE.read_text()
    assert len(source.splitlines()) <= 150
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    # numcodecs: the zstd decoder zarr itself calls (webdataset and Python 3.11 have none)
    assert imported <= {"__future__", "hashlib", "io", "json", "sys", "pathlib", "numpy", "zarr", "webdataset",
                        "numcodecs"}


def test_the_standalone_reader_refuses_an_unwritten_shard(tmp_path):
    url = str(tmp_path / "c")
    writer = create_cache(url, make_meta("webdataset", "int8", "uint8"))
    write_shards(writer, make_targets(), shards=[0])
    example = load_example()
    assert example.read_view(url, 1, 1)["crop"].tolist() == open_cache(url).read_view(1, 1)["crop"].tolist()
    with pytest.raises(SystemExit, match="shard 1 is not complete"):
        example.read_view(url, 2, 0)
