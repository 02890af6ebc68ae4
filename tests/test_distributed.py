"""Distributed bootstrap: launcher discovery, real mpirun and torchrun jobs, bounded waits."""

import datetime
import json
import sys
import threading
import time

import pytest
import torch.distributed as dist

from drope_megatron import distributed
from drope_megatron.distributed import attempt_prefix, free_port
from tests.helpers import run, torchrun

PROBE = "tests/workers/dist_probe.py"


def reports(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_discover_torchrun(monkeypatch):
    for key, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="1234").items():
        monkeypatch.setenv(key, value)
    assert distributed.discover() == distributed.DistEnv(3, 8, 1, "node7", 1234, "torchrun")


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


def test_torchrun_job_with_tp2(tmp_path):
    proc = torchrun(2, [PROBE, "report", "2", "1", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = reports(tmp_path)
    assert [r["rank"] for r in found] == [0, 1] and all(r["launcher"] == "torchrun" for r in found)
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


def test_a_failing_rank_ends_an_mpirun_job(tmp_path):
    """The failed rank reports in one line and aborts the MPI job. (On gloo the waiting rank would
    also see the closed connection; NCCL's collective would wait out the 2-minute timeout while
    MPI's finalize on the failed rank waited for it.)"""
    start = time.monotonic()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, PROBE, "fail", "1", "2",
           str(tmp_path)]
    proc = run(cmd, timeout=100)
    assert proc.returncode != 0 and "drope: error: probe: rank 1 fails" in proc.stderr, proc.stderr[-2000:]
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
