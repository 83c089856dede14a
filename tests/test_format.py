"""The cache as a public format (docs/format.md): the format version every cache records and what a
reader does with another one; the standalone reader (examples/read_cache.py) against the library on
every store x feature codec x chunk compressor; and the spec naming everything a cache holds."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import re
import tarfile
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
    assert json.loads((Path(url) / "tec_cache.json").read_text())["format_version"] == FORMAT_VERSION == "2.1"
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
    expected = f"cache {url} has format version 3.1, newer than the 2.1 this tec-pipeline reads: upgrade tec-pipeline to read it"
    with pytest.raises(UserError) as err:
        open_cache(url)
    assert str(err.value) == expected
    with pytest.raises(UserError, match="format version 3.1, newer than the 2.1"):  # a rerun of stage one too
        create_cache(url, make_meta(store, "float16", "float16"))
    result = CliRunner().invoke(app, ["inspect", url])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {expected}"
    with pytest.raises(SystemExit, match="format version 3.1, this reader reads 2.x"):
        load_example().read_view(url, 0, 0)


@pytest.mark.parametrize("version", [1, "1.0", "1.4"])
def test_an_older_major_is_refused_by_name(version, tmp_path):
    url = tiny_cache(tmp_path / "c", "zarr", "float32", "float32")
    set_version(url, version)
    with pytest.raises(UserError, match=r"format version 1\.\d, this tec-pipeline reads version 2.1 "
                                        r"\(views laid out so an epoch reads only its own\); rebuild it .*--overwrite"):
        open_cache(url)


@pytest.mark.parametrize("version", [None, "2", "v2.0", "2.0.1", 2.0, True])
def test_a_version_that_is_not_major_minor_is_damage(version, tmp_path):
    url = tiny_cache(tmp_path / "c", "zarr", "float32", "float32")
    set_version(url, version)
    with pytest.raises(CacheCorruptError, match=r"tec_cache.json is damaged \(format_version .* is not MAJOR.MINOR\)"):
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


# ----------------------------------------------------------------------------- the spec names all a cache holds

SPEC = REPO / "docs" / "format.md"
# Stage one's caches, one of each kind a name can appear in: the arrays of every feature codec, both
# stores, source images kept, pq parts in either store, and a skipped image (skipped lists, zeros).
STAGE_ONE = {
    "zarr-pq": ["cache.feat_dtype=pq", "cache.pq_subvectors=8", "cache.attn_dtype=uint8"],
    "zarr-int8-lz4": ["cache.feat_dtype=int8", "cache.attn_dtype=float16", "cache.compress=lz4"],
    "webdataset-int8": ["cache.store=webdataset", "cache.store_images=true", "cache.feat_dtype=int8",
                        "cache.attn_dtype=uint8"],
    "webdataset-pq": ["cache.store=webdataset", "cache.feat_dtype=pq", "cache.pq_subvectors=4"],
}


GROWN = ("zarr-pq", "webdataset-int8")  # caches grown to 3 views after stage one made them at 2


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Complete caches from stage one (with a file that is no image, skipped) and, from the
    library, an incomplete one of each store (one shard of three written)."""
    from tec_pipeline.stages.cache_targets import run_cache_targets
    from test_cache_targets import config, write_images

    images = write_images(tmp_path_factory.mktemp("format-images"))
    (images / "c1" / "99-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    root, made = tmp_path_factory.mktemp("format"), {}
    for name, extra in STAGE_ONE.items():
        made[name] = root / name
        run_cache_targets(config(made[name], images, "data.on_bad_image=skip", *extra))
        if name in GROWN:  # grown from 2 views to 3: a view part beside the files as made
            run_cache_targets(config(made[name], images, "data.on_bad_image=skip", "data.views=3", *extra))
    for store in ("zarr", "webdataset"):
        made[f"{store}-incomplete"] = root / f"{store}-incomplete"
        writer = create_cache(str(made[f"{store}-incomplete"]), make_meta(store, "int8", "uint8"))
        write_shards(writer, make_targets(), shards=[1])
    return made


def key_paths(value, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of a JSON value (an empty mapping or list is a leaf; the items of a
    list of mappings share the path ``name[]``)."""
    if isinstance(value, dict) and value:
        return {p for key, item in value.items() for p in key_paths(item, f"{prefix}.{key}" if prefix else key)}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {p for item in value for p in key_paths(item, prefix + "[]")}
    return {prefix}


def spec_sections() -> dict[str, str]:
    """{heading: the text under it, up to the next heading}."""
    sections, heading = {}, ""
    for line in SPEC.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        sections[heading] = sections.get(heading, "") + line + "\n"
    return sections


def spec_names(*headings: str) -> list[str]:
    """The code spans under every heading holding one of `headings`, whole document when none given."""
    sections = spec_sections()
    text = "".join(body for title, body in sections.items() if not headings or any(h in title for h in headings))
    return re.findall(r"`([^`\n]+)`", text)


def named(actual: str, names: list[str]) -> bool:
    """Whether `actual` is one of `names`, where ``<placeholder>`` stands for any non-empty text (a
    name that is a placeholder alone, as ``<shard>`` in the notation, names nothing)."""
    patterns = [re.split(r"<[^<>]+>", name) for name in names]
    return any(re.fullmatch(".+?".join(map(re.escape, parts)), actual) for parts in patterns if "".join(parts))


def unnamed(actuals, names: list[str]) -> list[str]:
    return sorted(a for a in set(actuals) if not named(a, names))


FILE_SECTIONS = ("Files", "zarr store", "pq parts")  # where the spec names files (not tar members)


def files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def test_the_check_catches_a_name_the_spec_does_not_give():
    """Not vacuous: a key, file or member added to caches later (a grown cache's lineage, say)
    is reported until docs/format.md names it."""
    added = ["meta.lineage.views", "summary.grown_views", "shards.0.views", "shard-00000-v00-000.idx", "feat/c/0/0"]
    assert unnamed(added, spec_names()) == sorted(added)
    assert unnamed(["lineage.json"], spec_names(*FILE_SECTIONS)) == ["lineage.json"]
    assert unnamed(["stats.skipped", "json"], spec_names("Completion markers")) == ["json", "stats.skipped"]


def test_the_spec_names_every_file_and_json_key_a_cache_holds(caches):
    names, marker_names = spec_names(), spec_names("Completion markers")
    for kind, root in caches.items():
        assert unnamed(files(root), spec_names(*FILE_SECTIONS)) == [], kind
        for piece in root.rglob("tec_cache.json"):  # the cache's own, and each view part's
            doc = json.loads(piece.read_text())
            if kind.endswith("incomplete"):  # the library tests' identity is made up: stage one's caches hold the real one
                del doc["meta"]["identity"]
            assert unnamed(key_paths(doc), names) == [], (kind, str(piece))
        for marker in root.rglob("_done/*.json"):
            assert unnamed(key_paths(json.loads(marker.read_text())), marker_names) == [], (kind, marker.name)


def test_the_spec_names_every_zarr_array_with_its_axes_dtype_codecs_and_attributes(caches):
    names, all_names = spec_names("zarr store", "pq parts"), spec_names()
    tables = "".join(body for title, body in spec_sections().items()
                     if "zarr store" in title or "pq parts" in title).splitlines()
    seen = set()
    for kind, root in caches.items():
        for path in root.rglob("zarr.json"):
            node, meta = path.parent.relative_to(root).as_posix(), json.loads(path.read_text())
            node = re.sub(r"^views-\d+-\d+/", "", node)  # a view part holds the arrays a cache does
            assert unnamed(meta, all_names) == [] and unnamed(meta["attributes"], names) == [], (kind, node)
            if meta["node_type"] == "array":  # its table row gives its axes and this dtype
                seen.add(node)
                codecs = re.findall(r'"name": "([^"]+)"', json.dumps(meta["codecs"]))
                assert unnamed(codecs, names) == [], (kind, node)
                rows = [line for line in tables if line.startswith(f"| `{node}` |")]
                assert len(rows) == 1, (kind, node)
                assert f"`[{', '.join(meta['dimension_names'])}]`" in rows[0], (kind, node)
                assert f"`{meta['data_type']}`" in rows[0], (kind, node)
    assert {"feat_step", "feat_codec/rotation", "feat_codec/codebooks", "label", "valid"} <= seen


def test_the_standalone_reader_reads_a_grown_cache_as_the_library_does(caches):
    """Views 0-1 from the files as made, view 2 from the view part: each field as the library reads it."""
    example = load_example()
    for kind in GROWN:
        reader = open_cache(str(caches[kind]))
        assert reader.views == 3 and json.loads((caches[kind] / "tec_cache.json").read_text())["meta"]["views"] == 2
        for image in range(reader.num_images):
            for view in range(3):
                ours, theirs = reader.read_view(image, view), example.read_view(caches[kind], image, view)
                for name, value in ours.items():
                    tolerance = PQ_ATOL if name == "feat" and kind.endswith("pq") else 0
                    np.testing.assert_allclose(theirs[name], value, rtol=0, atol=tolerance, err_msg=f"{kind} {name}")


def test_the_standalone_reader_refuses_a_grown_list_or_part_unlike_the_format(caches, tmp_path):
    url = shutil.copytree(caches["webdataset-int8"], tmp_path / "c")
    doc, example = json.loads((url / "tec_cache.json").read_text()), load_example()
    for entry in ({"views": [2, 3], "path": "../other"}, {"views": [3, 4], "path": "views-3-4"}):
        (url / "tec_cache.json").write_text(json.dumps({**doc, "grown": [entry]}))
        with pytest.raises(SystemExit, match=r": tec_cache.json lists the view part .* after 2 views$"):
            example.read_view(url, 0, 0)
    (url / "tec_cache.json").write_text(json.dumps(doc))
    part_file = url / "views-2-3" / "tec_cache.json"
    part = json.loads(part_file.read_text())
    part["meta"]["images_per_shard"] += 1  # another writer's part, sharded unlike the cache
    part_file.write_text(json.dumps(part))
    assert example.read_view(url, 0, 1)["crop"].shape == (5,)  # the cache's own views still read
    with pytest.raises(SystemExit, match=rf"views-2-3: its images or shards are not those of {url}$"):
        example.read_view(url, 0, 2)


def test_the_spec_names_every_webdataset_member_and_sample_key(caches):
    names = spec_names("webdataset store")
    suffixes = set()
    for kind, root in caches.items():
        for path in root.rglob("*.tar"):  # view parts' tars too
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    assert named(member.name, names), (kind, path.name, member.name)
                    suffixes.add(member.name.partition(".")[2])
                    if member.name.endswith(".json"):
                        info = json.loads(tar.extractfile(member).read())
                        assert unnamed(key_paths(info), names) == [], (kind, member.name)
    assert {"feat.npy.zst", "feat_step.npy.zst", "json", "png", "bin"} <= suffixes
