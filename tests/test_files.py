"""Atomic writes: the old file or the whole new one, never a half-written one."""
import errno
import json
import os

import pytest

from tec_pipeline import direct_io
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


def test_direct_writes_give_the_buffers_bytes_at_every_length(tmp_path, monkeypatch):
    """O_DIRECT writes whole aligned blocks from the staging buffer, then cuts the file to length:
    files of 0 bytes, one byte short of / at / past a block, and spanning several staging
    segments (shrunk to 3 blocks here) hold exactly their buffers' bytes."""
    import numpy as np

    monkeypatch.setattr(direct_io, "SEGMENT", 3 * direct_io.ALIGN)
    rng = np.random.default_rng(0)
    for n in (0, 1, direct_io.ALIGN - 1, direct_io.ALIGN, direct_io.ALIGN + 1, 10 * direct_io.ALIGN + 17):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        parts = [data[:n // 3], b"", data[n // 3:]]
        path = str(tmp_path / f"f{n}")
        if not direct_io.write_direct(path, parts):
            pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
        assert open(path, "rb").read() == data.tobytes(), n


def test_a_filesystem_that_refuses_o_direct_gets_a_buffered_write(tmp_path, monkeypatch):
    """EINVAL for O_DIRECT, at the open or at the first write: the file is written buffered instead,
    the same bytes, and no temporary file stays."""
    real_open = os.open

    def refuse_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refuse_write(fd, data):
        raise OSError(errno.EINVAL, "Invalid argument")

    for name, fake in (("open", refuse_open), ("write", refuse_write)):
        with monkeypatch.context() as m:
            m.setattr(direct_io.os, name, fake)
            path = tmp_path / name / "x"
            write_files_durably({str(path): [b"abc", b"def" * 3000]}, direct=True)
        assert path.read_bytes() == b"abc" + b"def" * 3000
        assert [p.name for p in path.parent.iterdir()] == ["x"]
