"""Shared fixtures: one single-process megatron world for in-process model tests."""

import os

# Multi-process children inherit these: CPU DeepSpeed, loopback gloo, one thread per rank.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# In-process DeepSpeed engines share the children's PATH: its CPU ops are rebuilt (20-50 s) each
# time a process sees another PATH than the build before it.
from tests.helpers import one_path  # noqa: E402

os.environ["PATH"] = one_path()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process with megatron's parallel state (TP=PP=1), shared by model tests."""
    from drope_megatron import distributed
    from drope_megatron.config import ParallelConfig

    env = distributed.initialize(ParallelConfig(), seed=1234)
    yield env
    distributed.shutdown()
