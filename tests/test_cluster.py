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
    for env, message in (({"NNODES": "2"}, "set MASTER_ADDR to the first node address"),
                         ({"MASTER_ADDR": "n0"}, "set NNODES to the number of nodes")):
        proc = subprocess.run(["cluster/torchrun-multinode.sh", "recalibrate", "recipe.yaml"], cwd=ROOT,
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
        assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize("script, env, expected", [
    ("torchrun-multinode.sh", {"MASTER_ADDR": "n0", "NNODES": "2"},
     "--nnodes 2 --nproc-per-node 8 --max-restarts 0 --rdzv-backend c10d --rdzv-endpoint n0:29500"),
    ("deepspeed-hostfile.sh", {}, "--hostfile /dev/null --master_port 29500 --no_local_rank --module drope_megatron.cli"),
    ("mpirun.sh", {"MASTER_ADDR": "n0", "MASTER_PORT": "1234", "NCCL_DEBUG": "INFO"},
     "-np 2 --bind-to none -x PATH -x LD_LIBRARY_PATH"),
])
def test_scripts_hand_the_launcher_its_settings(tmp_path, script, env, expected):
    """The launcher replaced by one that prints what it was given (the loopback runs that really
    launch are in tests/train/test_train_inputs.py): defaults and the forwarded environment."""
    launcher = script.split("-")[0].removesuffix(".sh")
    (tmp_path / launcher).write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / launcher).chmod(0o755)
    proc = subprocess.run([f"cluster/{script}", "recalibrate", "recipe.yaml"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.strip()
    assert args.startswith(expected) and args.endswith("drope_megatron.cli recalibrate recipe.yaml"), args
    if script == "mpirun.sh":
        forwarded = {args.split()[i + 1] for i, word in enumerate(args.split()) if word == "-x"}
        assert {"MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG"} <= forwarded


@pytest.mark.parametrize("env, message", [
    (dict(HOSTFILE="no-such-hostfile"), "HOSTFILE=no-such-hostfile is not a readable file"),
    # DeepSpeed's --num_gpus would drop the visible list and count from GPU 0
    (dict(NUM_GPUS="2", CUDA_VISIBLE_DEVICES="4,5"), "NUM_GPUS with CUDA_VISIBLE_DEVICES"),
])
def test_deepspeed_hostfile_refuses_what_deepspeed_would_only_warn_about(env, message):
    proc = subprocess.run(["cluster/deepspeed-hostfile.sh", "recalibrate", "recipe.yaml"], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
