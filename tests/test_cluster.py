"""cluster/ launch scripts: every one parses, and a missing setting stops one with a message that
names it. (The loopback runs of the torchrun, mpirun and DeepSpeed scripts are in
tests/train/test_train_inputs.py; the sbatch templates need a Slurm cluster.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import ROOT

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "cluster").rglob("*")
                 if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_multinode_torchrun_names_what_is_missing():
    proc = subprocess.run(["cluster/torchrun-multinode.sh", "recalibrate", "recipe.yaml"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "NNODES": "2"})
    assert proc.returncode != 0 and "set MASTER_ADDR to the first node address" in proc.stderr


@pytest.mark.parametrize("env, message", [
    (dict(HOSTFILE="no-such-hostfile"), "HOSTFILE=no-such-hostfile is not a readable file"),
    # DeepSpeed's --num_gpus would drop the visible list and count from GPU 0
    (dict(NUM_GPUS="2", CUDA_VISIBLE_DEVICES="4,5"), "NUM_GPUS with CUDA_VISIBLE_DEVICES"),
])
def test_deepspeed_hostfile_refuses_what_deepspeed_would_only_warn_about(env, message):
    proc = subprocess.run(["cluster/deepspeed-hostfile.sh", "recalibrate", "recipe.yaml"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
