"""Run metrics: one JSON line per logged step (rank 0), optionally mirrored to tensorboard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from drope_megatron import atomic
from drope_megatron.config import ConfigError


class MetricsLog:
    """metrics.jsonl of a run starting (or resuming) at step `start`: lines of later steps, left by
    the part of an interrupted run after its last checkpoint, are dropped, since this run logs
    those steps again."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, enabled: bool, start: int = 0):
        self.file = None
        self.board = None
        if not enabled or run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= start]
            atomic.write_text(path, "".join(kept))
        self.file = open(path, "a")
        if tensorboard:  # tensorboard hides the old events of steps past `start` likewise (a fresh folder has none)
            self.board = require_tensorboard()(str(run_dir / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
            self.file.flush()
        if self.board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut by a crash


def require_tensorboard():
    """torch's tensorboard `SummaryWriter`, or a one-line error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter
