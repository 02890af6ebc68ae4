"""Atomic output: files and folders are written beside their target, then renamed into place,
so readers never see half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make `latest` and metadata owner-only
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def staging_dir(dst: Path) -> Path:
    """Where a folder is built before it is published as `dst` (a hidden sibling)."""
    return dst.with_name(f".{dst.name}.partial")


def refuse_existing(dst: Path, overwrite: bool) -> None:
    from drope_megatron.config import ConfigError

    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists: pass --overwrite to replace it")


def publish_dir(staging: Path, dst: Path) -> None:
    """Move a finished folder into place. An old `dst` is set aside first and removed only after
    the new one is in place, so at every moment one complete version exists."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    staging.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
