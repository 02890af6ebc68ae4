"""Atomic writes: the file appears whole, with the permissions an ordinary write would give it; a
published folder's bytes are on disk before its name."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_folder_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    staging, dst = tmp_path / ".out.partial", tmp_path / "out"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"a")
    (staging / "sub" / "b.bin").write_bytes(b"b")
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):  # the real fsync, noting what it synced and whether `out` existed yet
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), dst.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic.publish_dir(staging, dst)
    assert {path for path, published in synced if not published} == {
        staging / "a.bin", staging / "sub" / "b.bin", staging / "sub", staging}
    assert synced[-1] == (tmp_path, True)  # then the rename itself
    assert (dst / "sub" / "b.bin").read_bytes() == b"b" and not staging.exists()
