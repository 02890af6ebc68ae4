"""Resumable training checkpoints: DeepSpeed's engine state plus ours (step, data stream, RNG).

    RUN/checkpoints/step00000100/   DeepSpeed files (model, optimizer, scheduler) + drope_state.json
    RUN/checkpoints/latest          the tag of the newest complete checkpoint

`latest` moves (atomically) only after every rank has finished writing and the checkpoint's bytes
are on disk, so a crash mid-write (or a power loss just after) leaves the previous checkpoint in
charge; older tags beyond `keep_last` are removed after that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from drope_megatron import atomic
from drope_megatron.config import ConfigError

STATE = "drope_state.json"


def latest_tag(ckpt_dir: Path) -> str | None:
    marker = ckpt_dir / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            # This rank's device only: a resume may see fewer GPUs (one per task under srun).
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state["cuda"]
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible device
            cuda = cuda[torch.cuda.current_device() % len(cuda)]
        torch.cuda.set_rng_state(cuda)
    get_cuda_rng_tracker().set_states(state["tracker"])


def save(engine, ckpt_dir: Path, step: int, position: int, layout: dict[str, int], keep_last: int,
         data: dict[str, Any]) -> str:
    """Collective: write checkpoint `step` (with the data stream's `data` state), then publish it as
    latest and prune old ones."""
    tag = f"step{step:08d}"
    client = {"step": step, "data_position": position, "rng": rng_state(), "data": data}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    dist.barrier()
    # DeepSpeed's torch.save does not fsync. One process per node syncs the checkpoint's files:
    # fsync flushes a file's cached pages whichever local process wrote them (and is cheap for the
    # files other nodes wrote and synced).
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        atomic.sync_tree(ckpt_dir / tag)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic.write_json(ckpt_dir / tag / STATE, {"step": step, "data_position": position, **layout})
        atomic.sync_path(ckpt_dir / tag)  # STATE's name, before latest points here
        atomic.write_text(ckpt_dir / "latest", tag + "\n")
        atomic.sync_path(ckpt_dir)  # latest's name, before an old tag goes
        _prune(ckpt_dir, tag, keep_last)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Keep `tag` (just written) and the newest of the ones before it; a later step can only be left
    by a run this one replaced (its `latest` removed), and this run would overwrite it anyway."""
    # Only complete checkpoints count; a partial one (a crash mid-write) is overwritten on resume.
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if (p / STATE).is_file())
    keep = [name for name in complete if name <= tag][-keep_last:]
    for old in set(complete) - set(keep):
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def load(engine, ckpt_dir: Path, layout: dict[str, Any]) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint into the engine; None when there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    if not (ckpt_dir / tag / STATE).is_file():
        raise ConfigError(f"{ckpt_dir / 'latest'} names {tag}, which is missing or incomplete: delete {ckpt_dir} "
                          "to start over")
    state = json.loads((ckpt_dir / tag / STATE).read_text())
    # A key an older checkpoint lacks (the phase) is taken to match.
    changed = {k: (state[k], v) for k, v in layout.items() if state.get(k, v) != v}
    if changed:
        was = ", ".join(f"{k}={a} now {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"checkpoint {ckpt_dir / tag} was written with other settings ({was}): resume with "
                          "those, or start a new run directory")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ConfigError(f"checkpoint {ckpt_dir / tag} could not be loaded: delete {ckpt_dir} to start over")
    set_rng_state(client["rng"])
    return client
