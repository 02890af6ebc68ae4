"""The benchmarks' child processes: every measurement runs in a fresh process (nothing it imported or
allocated is left for the next), a failed or stuck child stops the benchmark with its own error,
and `measured` gives a command's wall time and peak RSS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
# Runs the command, then reports its wall time and the peak RSS of its largest process (in KiB); a
# command killed by a signal is reported by the signal's number, negative, as subprocess does.
_PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
          "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
          "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
          "sys.exit(0 if done.returncode == 0 else f'exit status {done.returncode}')")


def run(cmd: list[str], timeout: float = 1800, label: list[str] | None = None) -> str:
    """The child's stdout. On failure or timeout its stderr's tail and an exit (the ratios would
    mean nothing); a stuck or interrupted child is killed with every process it started (torch's
    launcher puts its ranks in sessions of their own). `label`: the command to name in errors."""
    name = " ".join(map(str, (label or cmd)[:4]))
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        sys.exit(f"{name} ... still running after {timeout:.0f} s: stopped")
    except BaseException:  # Ctrl-C here must not leave the measurement running
        _kill_tree(proc)
        raise
    if proc.returncode:
        sys.exit(f"{name} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    proc.wait()


def measured(cmd: list[str], timeout: float = 1800) -> dict:
    """Wall time (s) and peak RSS (GiB) of `cmd`, run under a small probe process so that the peak
    is the command's own, not this script's."""
    seconds, kib = run([sys.executable, "-c", _PROBE, *cmd], timeout, label=cmd).split()
    return {"seconds": float(seconds), "peak_rss_gib": int(kib) / 2**20}
