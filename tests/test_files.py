"""Atomic writes: the old file or the whole new one, never a half-written one."""
import json

import pytest

from tec_pipeline.errors import StorageError
from tec_pipeline.files import IOV_MAX, atomic_path, write_files_durably, write_json


def test_atomic_path_replaces_only_after_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')  # half written, then the writer dies
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left
    write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3}


def test_write_files_durably_writes_each_file_as_its_buffers_back_to_back(tmp_path):
    import numpy as np

    many = [bytes([i % 251]) * (i % 7 + 1) for i in range(IOV_MAX * 2 + 5)]  # more than one writev call
    files = {str(tmp_path / "a" / "x"): many, str(tmp_path / "b" / "y"): [np.arange(10, dtype=np.uint8), b"end"]}
    write_files_durably(files)
    assert (tmp_path / "a" / "x").read_bytes() == b"".join(many)
    assert (tmp_path / "b" / "y").read_bytes() == bytes(range(10)) + b"end"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x", "y"]  # no temporary left


def test_write_files_durably_names_the_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    files = {str(tmp_path / "ok"): [b"fine"], str(tmp_path / "blocker" / "z"): [b"never"]}
    with pytest.raises(StorageError, match=r"^cannot write the shard file .*blocker/z: .* free there\)$"):
        write_files_durably(files, "the shard file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # nothing renamed into place
