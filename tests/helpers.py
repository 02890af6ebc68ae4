"""Test helpers: tiny recipes, tiny models, subprocess launchers with outer timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from drope_megatron.config import load_recipe
from drope_megatron.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=256", "model.seq_length=32",
    "model.make_vocab_size_divisible_by=64", "model.init_method_std=0.2",
]


def tiny_recipe(*overrides: str):
    return load_recipe(None, [*TINY, *overrides])


def tiny_model(*overrides: str, seed: int = 0):
    """A fresh tiny model; the same seed and shapes give the same weights."""
    from drope_megatron.model import build_model

    recipe = tiny_recipe(*overrides)
    torch.manual_seed(seed)
    return build_model(recipe.model, recipe.parallel), recipe


def batch(recipe, n: int = 2, length: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    length = length or recipe.model.seq_length
    tokens = torch.randint(0, recipe.model.vocab_size, (n, length), generator=gen)
    return tokens, torch.arange(length).expand(n, length)


def one_path() -> str:
    """PATH with the venv first, each directory once: what children and this process both use."""
    dirs = [str(Path(sys.executable).parent), *os.environ["PATH"].split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(dirs))


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: one thread each, this checkout importable, and the venv's
    launchers (torchrun, deepspeed) first on one PATH for all. DeepSpeed's CPU ops are JIT-built
    and rebuilt (about a minute) whenever a child sees another PATH than the one before."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=one_path())
    env.update(extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(cmd: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run a command under an outer timeout; on timeout the whole process group (launcher and
    ranks) is killed, so no rank outlives its test."""
    proc = subprocess.Popen(cmd, env=child_env(**env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... still running after {timeout} s:\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int, args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N` on loopback with a fresh port: the real launcher."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    return run(cmd, timeout=timeout, **env)


def drope(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "drope_megatron.cli", *args], timeout=timeout, **env)
