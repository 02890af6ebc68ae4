"""Atomic writes: the file appears whole, with the permissions an ordinary write would give it; a
published folder's bytes are on disk before its name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drope_megatron import atomic
from drope_megatron.config import ConfigError


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


def test_a_failed_write_leaves_nothing_and_a_written_file_is_synced_before_its_name(tmp_path, monkeypatch):
    with pytest.raises(TypeError):
        atomic.write_text(tmp_path / "state.json", 3)  # fails inside the write
    assert list(tmp_path.iterdir()) == []
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "state.json", "{}")
    assert events == ["fsync", "replace"] and (tmp_path / "state.json").read_text() == "{}"


def test_publishing_over_a_folder_replaces_it_whole_or_keeps_it(tmp_path, monkeypatch):
    staging, dst = tmp_path / ".out.partial", tmp_path / "out"
    for folder, text in ((dst, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    atomic.publish_dir(staging, dst)
    assert (dst / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    staging.mkdir()
    (staging / "f").write_text("newer")
    real_rename = Path.rename

    def failing(self, target):  # the new folder cannot be moved in: the old one stays in place
        if self == staging:
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        atomic.publish_dir(staging, dst)
    assert (dst / "f").read_text() == "new"


def test_an_output_that_holds_the_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for dst in (tmp_path, tmp_path / "sub", Path(".")):
        with pytest.raises(ConfigError, match="is \\(or holds\\) the current folder"):
            atomic.refuse_existing(dst, overwrite=True)
