"""Atomic writes: the file appears whole, with the permissions an ordinary write would give it."""

from __future__ import annotations

import os

from drope_megatron import atomic


def test_written_files_are_whole_and_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "sub" / "state.json", {"step": 3})
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "state.json"
    assert path.read_text() == '{\n  "step": 3\n}\n' and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left beside it
