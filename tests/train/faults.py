"""Fault injection for training tests: start a job in the background, wait for a step, hit a rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from drope_megatron.distributed import free_port
from tests.helpers import ROOT, child_env


def start(args: list[str], nproc: int = 1, torchrun_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    """The job in its own process group (so a test can always kill all of it)."""
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", "drope_megatron.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", *torchrun_args, "-m", "drope_megatron.cli", *args]
    return subprocess.Popen(cmd, env=child_env(**env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before step {step}:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    kill_all(proc)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "drope_megatron.cli" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, float, str]:
    """Wait for the job to end by itself; (return code, seconds waited, stderr)."""
    start_time = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise AssertionError(f"job still running {timeout} s after the fault") from None
    return proc.returncode, time.monotonic() - start_time, err


def kill_all(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def kill_during_checkpoint_write(ckpt_dir: Path, proc: subprocess.Popen, marker: str,
                                 timeout: float = 180) -> str | None:
    """SIGKILL the job the moment a checkpoint folder has files but not yet its completion `marker`.

    Returns the tag killed mid-write, or None when the write finished between seeing it and the kill
    (then the caller starts the job again and retries)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in ckpt_dir.glob("step*") if ckpt_dir.is_dir() else []:
            if not (folder / marker).exists() and any(folder.rglob("*.pt")):
                kill_all(proc)
                return None if (folder / marker).exists() else folder.name
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before a checkpoint write was caught")
        time.sleep(0.001)
    kill_all(proc)
    raise AssertionError(f"no checkpoint write seen in {timeout} s")
