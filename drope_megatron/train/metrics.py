"""Run metrics: one JSON line per logged step (rank 0), optionally mirrored to tensorboard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from drope_megatron.config import ConfigError


class MetricsLog:
    def __init__(self, run_dir: Path | None, tensorboard: bool, enabled: bool):
        self.file = None
        self.board = None
        if not enabled or run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") \
                    from None
            self.board = SummaryWriter(str(run_dir / "tensorboard"))

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
