"""Distributed bootstrap: launcher discovery, real mpirun and torchrun jobs, bounded waits."""

import datetime
import json
import os
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from drope_megatron import distributed
from drope_megatron.config import ConfigError, ParallelConfig
from drope_megatron.distributed import attempt_prefix, free_port
from tests.helpers import run, torchrun

PROBE = "tests/workers/dist_probe.py"


def reports(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_discover_torchrun(monkeypatch):
    for key, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="1234").items():
        monkeypatch.setenv(key, value)
    assert distributed.discover() == distributed.DistEnv(3, 8, 1, "node7", 1234, "torchrun")
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("SLURM_LOCALID", "0")  # torchrun inside an allocation: its own LOCAL_RANK wins
    assert distributed.discover() == distributed.DistEnv(3, 8, 1, "node7", distributed.DEFAULT_PORT, "torchrun")
    assert distributed.DEFAULT_PORT == 29500  # torchrun's, which cluster scripts and users assume
    for key in ("LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a world of one needs no address: the loopback
    assert distributed.discover() == distributed.DistEnv(0, 1, 0, "127.0.0.1", distributed.DEFAULT_PORT, "torchrun")


def test_discover_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_LOCALID="1",
               SLURM_JOB_ID="424242", SLURM_JOB_NODELIST="gpu[007-010,12]")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    found = distributed.discover()
    assert (found.rank, found.world_size, found.local_rank, found.launcher) == (5, 16, 1, "slurm")
    assert found.master_addr == "gpu007" and found.master_port == distributed.slurm_port(env)
    ports = {distributed.slurm_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})
             for job in range(1000, 1100) for step in range(3)}
    assert len(ports) == 300 and all(20000 <= port < 32768 for port in ports)  # steps differ; no ephemeral port
    monkeypatch.setenv("SLURM_STEP_NODELIST", "b[1-2]")  # the step's nodes, not the allocation's
    assert distributed.discover().master_addr == "b1"
    monkeypatch.setenv("MASTER_ADDR", "head")  # set by the batch script: it wins
    assert distributed.discover().master_addr == "head"


def test_a_one_task_srun_step_takes_a_free_port(monkeypatch):
    """`srun --pty bash` runs its commands in a step of one task: two at once must not share a port."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    env = dict(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ports = {distributed.discover().master_port for _ in range(3)}
    assert len(ports) > 1 and distributed.slurm_port(env) not in ports


def test_rank_variables_set_by_hand_take_the_launchers_local_rank(monkeypatch):
    for key in ("LOCAL_RANK", "MASTER_ADDR", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(RANK="11", WORLD_SIZE="16", SLURM_LOCALID="3", MASTER_ADDR="n0").items():
        monkeypatch.setenv(key, value)
    assert distributed.discover().local_rank == 3  # export RANK=$SLURM_PROCID in a batch script
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")  # mpirun in an allocation: MPI's own local rank
    assert distributed.discover().local_rank == 1
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK")
    for missing in ("SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(missing)
        name = "LOCAL_RANK" if missing == "SLURM_LOCALID" else missing
        with pytest.raises(ConfigError, match=f"WORLD_SIZE=16 are set but {name} is not"):
            distributed.discover()
        monkeypatch.setenv(missing, "0")


def test_one_gpu_per_task_tells_deepspeed_its_device(monkeypatch):
    """Under srun --gpus-per-task=1 task 3 of a node sees one GPU, its cuda:0. DeepSpeed sets the
    device LOCAL_RANK names (and asserts OpenMPI's local rank is the same): both must say 0."""
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    env = distributed.DistEnv(3, 8, 3, "n0", 1234, "slurm")
    device = distributed.device_index(env.local_rank, 1)
    exported = distributed.launcher_vars(env, device)
    assert device == 0 and exported["LOCAL_RANK"] == exported["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
    assert distributed.launcher_vars(env, None)["LOCAL_RANK"] == "3"  # no GPU: the place on the node
    with pytest.raises(ConfigError, match="local rank 3 on a node with 2 GPUs"):
        distributed.device_index(3, 2)
    with pytest.raises(ConfigError, match="local rank 2 on a node with 2 GPUs"):
        distributed.device_index(2, 2)
    assert distributed.device_index(1, 2) == 1


def test_nccl_without_a_gpu_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nccl is usable")
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA GPUs"):
        distributed.backend_for(ParallelConfig(backend="nccl"))


def test_batch_script_without_srun_is_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the allocation's size, not this process's job
    assert distributed.discover().launcher == "single"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-4],b1", "a3"), ("x-y[09,11]", "x-y09"),
                                            ("node[1-2]-ib", "node1-ib"), ("rack[1-2]-n[01-04],z", "rack1-n01")])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_single_process_without_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(key, raising=False)
    found = distributed.discover()
    assert (found.rank, found.world_size, found.launcher) == (0, 1, "single")


def test_a_process_group_set_up_by_the_caller_is_the_job_with_tp2(tmp_path):
    """Its ranks are the job's, though the launcher's variables are gone (a caller's own init_method).
    (Every other torchrun test joins through torchrun's variables.)"""
    proc = torchrun(2, [PROBE, "joined", "2", "1", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = reports(tmp_path)
    assert [(r["rank"], r["world_size"]) for r in found] == [(0, 2), (1, 2)]
    assert all(r["launcher"] == "existing" and r["group_kept"] for r in found)
    assert all(r["sum"] == 3.0 and r["tp_sum"] == 2.0 for r in found)
    assert [r["tp_rank"] for r in found] == [0, 1]


@pytest.mark.parametrize("pmi, message", [
    # MPICH/Intel MPI's mpiexec inside an allocation: the proxy's SLURM_PROCID (a node index) is not the rank.
    (dict(SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", PMI_RANK="13", PMI_SIZE="16"),
     "mpi4py sees a world of 1 but the launcher started 16"),
    (dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2"), "mpi4py sees a world of 1 but the launcher started 4"),
])
def test_an_mpi_world_is_taken_from_mpi_and_checked(pmi, message):
    """Run outside mpirun, mpi4py sees a world of one: the launcher's size is checked against it
    (an mpi4py built for another MPI makes every process rank 0 of its own job)."""
    proc = run([sys.executable, "-c", "from drope_megatron import distributed; distributed.discover()"], timeout=60,
               **pmi)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_srun_with_pmi_is_slurms(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(SLURM_PROCID="3", SLURM_STEP_NUM_TASKS="8", PMI_RANK="3", PMI_SIZE="8").items():
        monkeypatch.setenv(key, value)
    found = distributed.discover()  # srun --mpi=pmi2: both agree, no MPI needed
    assert (found.rank, found.world_size, found.launcher) == (3, 8, "slurm")
    for key, value in (("PMI_RANK", "4"), ("PMI_SIZE", "16")):  # an mpirun job inside the allocation
        monkeypatch.setenv(key, value)
        assert not distributed._pmi_agrees_with_slurm(dict(os.environ))
        monkeypatch.setenv(key, {"PMI_RANK": "3", "PMI_SIZE": "8"}[key])


@pytest.mark.parametrize("mode, message, status", [
    # while joining: rank 0 would wait in the rendezvous, and rank 1 in MPI's finalize, for the timeout
    ("fail_init", "drope: error: parallel.backend=nccl needs CUDA GPUs", 2),
    ("diverge", "drope: error: probe: rank 1 diverges", 3),  # the status a diverged run has everywhere
])
def test_a_failing_rank_ends_an_mpirun_job(tmp_path, mode, message, status):
    """The failed rank reports in one line and aborts the MPI job with the command's status. (On gloo
    the waiting rank would also see the closed connection; NCCL's collective would wait out the
    2-minute timeout while MPI's finalize on the failed rank waited for it.)"""
    start = time.monotonic()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, PROBE, mode, "1", "2",
           str(tmp_path)]
    proc = run(cmd, timeout=100)
    assert proc.returncode == status and message in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    assert time.monotonic() - start < 60


def test_mpirun_job(tmp_path):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, PROBE, "report", "1", "1",
           str(tmp_path)]
    # Inside a Slurm allocation mpirun's ranks inherit SLURM_* variables: MPI's own must win.
    proc = run(cmd, timeout=120, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = reports(tmp_path)
    assert [r["rank"] for r in found] == [0, 1] and all(r["launcher"] == "mpi" for r in found)
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in found)


def test_frozen_peer_ends_the_job_within_the_timeout(tmp_path):
    start = time.monotonic()
    proc = torchrun(2, [PROBE, "stall", "1", "0.1", str(tmp_path)], timeout=180)  # 6 s collective timeout
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 90, f"job took {elapsed:.0f} s to notice a frozen peer"
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[-2000:]


def test_world_not_multiple_of_model_parallel_is_refused(tmp_path):
    proc = torchrun(2, [PROBE, "report", "4", "1", str(tmp_path)], timeout=120)
    assert proc.returncode != 0
    assert "world size 2 is not a multiple of TP*PP=4" in proc.stderr


def test_attempt_prefix_is_fresh_and_agreed_despite_stale_keys():
    """A second attempt on the same store (torchrun's agent store after a restart) agrees on a new
    prefix even when a worker arrives while the previous attempt's keys are still there."""
    timeout = datetime.timedelta(seconds=20)
    server = dist.TCPStore("127.0.0.1", free_port(), 3, is_master=True, timeout=timeout, wait_for_workers=False)

    def attempt(order):
        out = {}

        def worker(rank):
            client = dist.TCPStore("127.0.0.1", server.port, 3, is_master=False, timeout=timeout)
            out[rank] = attempt_prefix(client, rank, 3, timeout)

        threads = [threading.Thread(target=worker, args=(r,)) for r in order]
        for t in threads:
            t.start()
            time.sleep(0.1)  # workers of an attempt start at different times
        for t in threads:
            t.join(30)
        return out

    first = attempt([0, 1, 2])
    # A worker of the first attempt killed between counting its hello and writing it: later ones still get in.
    dist.TCPStore("127.0.0.1", server.port, 3, is_master=False, timeout=timeout).add("drope/hellos", 1)
    second = attempt([2, 1, 0])  # ranks 1 and 2 find the first attempt's hello/reply keys
    assert len(set(first.values())) == 1 and len(first) == 3
    assert len(set(second.values())) == 1 and len(second) == 3
    assert first[0] != second[0]
