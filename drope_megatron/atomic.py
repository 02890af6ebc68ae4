"""Atomic output: files and folders are written beside their target, then renamed into place,
so readers never see half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 would make `latest` and metadata owner-only
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """The mode an ordinary new file gets: 0666 less the umask. Reading the umask sets it for a
    moment, so call this where no other thread is creating files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def staging_dir(dst: Path) -> Path:
    """Where a folder is built before it is published as `dst` (a hidden sibling)."""
    return dst.with_name(f".{dst.name}.partial")


def refuse_existing(dst: Path, overwrite: bool, marker: str | None = None,
                    owned: Callable[[Path], bool] | None = None) -> None:
    """An output folder that may be (re)placed: not there, or `overwrite` given and it is one this
    command wrote (it holds `marker`, or `owned` says so) or empty. Replacing removes the whole
    folder, so never the current folder or one holding it, and never a folder of other files."""
    from drope_megatron.config import ConfigError

    here, target = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(dst))
    if target == here or target in here.parents:
        raise ConfigError(f"{dst} is (or holds) the current folder, which the output would replace: name a new "
                          "folder")
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists: pass --overwrite to replace it")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not (owned(dst) if owned else marker is None or (dst / marker).exists()):
        what = f"no {marker}" if marker else "files this command does not write"
        raise ConfigError(f"{dst} holds other files ({what}: not an output of this command), which "
                          "--overwrite would delete: name a new folder or empty it yourself")


def publish_dir(staging: Path, dst: Path) -> None:
    """Move a finished folder into place. An old `dst` is set aside first and removed only after
    the new one is in place, so at every moment one complete version exists. The folder's bytes
    reach the disk before its name does: without that, a crash soon after could leave a
    published folder of empty files (file systems may commit a rename before the data)."""
    sync_tree(staging)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    try:
        staging.rename(dst)
    except BaseException:
        if old.exists() and not dst.exists():  # the old version back where it was
            old.rename(dst)
        raise
    sync_path(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then `folder` itself (cheap for bytes already synced)."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # children before their folder
        if not path.is_symlink():
            sync_path(path)
    sync_path(folder)


def sync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (FUSE, CIFS) cannot fsync a folder; its files are synced all the same.
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)
