"""Atomic writes: the old file or the whole new one, never a half-written one."""
import json

import pytest

from tec_pipeline.files import atomic_path, write_json


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
