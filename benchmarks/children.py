"""The benchmarks' child processes: every measurement runs in a fresh process (nothing it imported or
allocated is left for the next), a failed or stuck child stops the benchmark with its own error,
and `measured` gives a command's wall time and peak RSS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Runs the command, then reports its wall time and the peak RSS of its largest process (in KiB).
_PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
          "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
          "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
          "sys.exit(done.returncode)")


def run(cmd: list[str], timeout: float = 1800) -> str:
    """The child's stdout. On failure or timeout its stderr's tail and an exit (the ratios would
    mean nothing); a stuck child is killed with everything it started (launchers' ranks too)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... still running after {timeout:.0f} s:\n{err[-3000:]}")
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return out


def measured(cmd: list[str], timeout: float = 1800) -> dict:
    """Wall time (s) and peak RSS (GiB) of `cmd`, run under a small probe process so that the peak
    is the command's own, not this script's."""
    seconds, kib = run([sys.executable, "-c", _PROBE, *cmd], timeout).split()
    return {"seconds": float(seconds), "peak_rss_gib": int(kib) / 2**20}
