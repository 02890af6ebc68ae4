"""Distributed bootstrap: who am I, who is master, process groups, megatron parallel state.

`discover()` reads the launcher's environment (torchrun, Slurm, OpenMPI/MPICH via mpi4py,
or none: a single process). `initialize(parallel_cfg, seed)` creates the default process
group (nccl with CUDA, gloo without) with a bounded timeout, sets up megatron's TP/PP/DP
groups and the model-parallel RNG seeds. `shutdown()` undoes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from drope_megatron.compat import apply_cpu_shims
from drope_megatron.config import ConfigError, ParallelConfig

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """One process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single


def discover() -> DistEnv:
    """Rank, world size and rendezvous address from whichever launcher started us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or set by hand
        return _from_rank_vars(env)
    # mpirun inside a Slurm allocation inherits SLURM_* from its daemons: MPI's own variables win.
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpi(env)
    # SLURM_STEP_NUM_TASKS is set by srun only; a batch script alone (one process) is not a job of N.
    # MPICH / Intel MPI's mpiexec starts its per-node proxies with srun, so its ranks carry the
    # proxy's SLURM_PROCID (the node's index): a PMI world that disagrees with Slurm's is MPI's.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and _pmi_agrees_with_slurm(env):
        return _from_slurm(env)
    if any(k in env for k in ("PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return _from_mpi(env)
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def _from_rank_vars(env) -> DistEnv:
    world = int(env["WORLD_SIZE"])
    # Set by hand inside srun/mpirun (export RANK=$SLURM_PROCID): the launcher still knows the node-local
    # rank. MPI's own first: mpirun inside a Slurm allocation inherits the allocation's SLURM_LOCALID.
    local = next((env[k] for k in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
                  if k in env), "0" if world == 1 else None)
    addr = env.get("MASTER_ADDR", "127.0.0.1" if world == 1 else None)
    for name, value in (("LOCAL_RANK", local), ("MASTER_ADDR", addr)):
        if value is None:  # every rank on GPU 0, or every node meeting on its own loopback
            raise ConfigError(f"RANK and WORLD_SIZE={world} are set but {name} is not: set {name} as torchrun does")
    return DistEnv(int(env["RANK"]), world, int(local), addr, int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")


def _pmi_agrees_with_slurm(env) -> bool:
    return (env.get("PMI_SIZE", env["SLURM_STEP_NUM_TASKS"]) == env["SLURM_STEP_NUM_TASKS"]
            and env.get("PMI_RANK", env["SLURM_PROCID"]) == env["SLURM_PROCID"])


def slurm_port(env) -> int:
    """A port every task of one job step computes alike without talking: from the job and step ids
    (two steps of a job may run at once on one node), below Linux's ephemeral range (32768+)."""
    return 20000 + (int(env.get("SLURM_JOB_ID", "0")) * 101 + int(env.get("SLURM_STEP_ID", "0"))) % 12000


def _from_slurm(env) -> DistEnv:
    # srun starts every task itself: the first host of the allocation is the master.
    first = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    world = int(env["SLURM_STEP_NUM_TASKS"])
    # A step of one task (srun --pty bash) may run several commands at once: no fixed port for it.
    port = int(env.get("MASTER_PORT", 0)) or (slurm_port(env) if world > 1 else free_port())
    return DistEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                   env.get("MASTER_ADDR", first), port, "slurm")


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003', 'r[1-2]-n[01-04]' -> 'r1-n01'."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first:
        raise ConfigError(f"cannot read Slurm nodelist {nodelist!r}: set MASTER_ADDR")
    return re.sub(r"\[([^\]]+)\]", lambda m: re.split("[,-]", m.group(1))[0], first.group(0))


def _from_mpi(env) -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("launched by MPI but mpi4py is missing: pip install mpi4py (make setup does)") from None

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    started = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
    if started is not None and int(started) != size:  # each process would be rank 0 of its own job
        raise ConfigError(f"mpi4py sees a world of {size} but the launcher started {started}: mpi4py is built "
                          "against another MPI than this mpirun; reinstall it with this MPI's mpicc")
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK")))
    local = int(local) if local is not None else comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    # Rank 0 picks the address and a free port and tells everyone (mpirun sets neither).
    addr = env.get("MASTER_ADDR") or (socket.gethostname() if size > 1 else "127.0.0.1")
    port = int(env.get("MASTER_PORT", 0)) or (free_port() if rank == 0 else 0)
    addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
    return DistEnv(rank, size, local, addr, port, "mpi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def compute_device() -> torch.device:
    """Where this process computes: its GPU (chosen by `initialize`), else the CPU. Models are built
    on the host (use_cpu_initialization), so a caller moves its model here."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _data_parallel(whole_model: bool) -> tuple[int, int, Any]:
    """(rank, size, group) of the data-parallel ranks. With `whole_model` (a model every process
    holds entire, such as a transformers one, which megatron's TP does not split) every process of
    the world is one: its TP ranks would otherwise repeat each other's work."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    if whole_model:
        return dist.get_rank(), dist.get_world_size(), None  # None: the world group
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def data_parallel_share(items: list, whole_model: bool = False) -> list:
    """This data-parallel rank's share of `items` (every dp-th, from its rank), all of them outside
    a job. The TP ranks of one group get the same share, so their collectives stay paired."""
    rank, size, _ = _data_parallel(whole_model)
    return list(items)[rank::size]


def data_parallel_sum(t: torch.Tensor, whole_model: bool = False) -> torch.Tensor:
    """`t` summed over the data-parallel ranks (on this rank's device for NCCL), returned where it was."""
    _, size, group = _data_parallel(whole_model)
    if size == 1:
        return t
    moved = t.to(compute_device())
    dist.all_reduce(moved, group=group)
    return moved.to(t.device)


def data_parallel_gather(obj: Any, whole_model: bool = False) -> list:
    """Every data-parallel rank's `obj`, in rank order (picklable values: small results, not tensors)."""
    _, size, group = _data_parallel(whole_model)
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def backend_for(p: ParallelConfig) -> str:
    if p.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs, and this process sees none: use gloo (or auto)")
    if p.backend != "auto":
        return p.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_index(local_rank: int, count: int) -> int:
    """This process's GPU: its place on the node, or the one GPU a task sees under srun --gpus-per-task=1."""
    if count > 1 and local_rank >= count:  # two ranks would share a GPU, and NCCL fail much later
        raise ConfigError(f"local rank {local_rank} on a node with {count} GPUs: launch at most {count} "
                          "processes per node")
    return local_rank % count


def launcher_vars(env: DistEnv, device: int | None) -> dict[str, str]:
    """The variables a launcher sets, for libraries that read them (DeepSpeed) whatever launched us.
    DeepSpeed takes LOCAL_RANK for its device index (and asserts OpenMPI's local rank is the same):
    with one GPU per task that is the task's GPU 0, not its place on the node."""
    local = str(env.local_rank if device is None else device)
    out = dict(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=local)
    if env.master_addr:
        out.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        out["OMPI_COMM_WORLD_LOCAL_RANK"] = local
    return out


def _joined() -> DistEnv:
    """A process group the caller set up itself (any init_method): its ranks are the job's."""
    env = os.environ
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", ""),
                   int(env.get("MASTER_PORT", 0)), "existing")


def initialize(p: ParallelConfig, seed: int = 1234, env: DistEnv | None = None) -> DistEnv:
    """Join the job (`env`: as discovered), set up megatron's TP/PP/DP groups and seed the model-parallel RNGs."""
    apply_cpu_shims()
    env = env or (_joined() if dist.is_initialized() else discover())
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if env.world_size % model_parallel:
        raise ConfigError(
            f"world size {env.world_size} is not a multiple of TP*PP={model_parallel}: "
            f"launch a multiple of {model_parallel} processes or lower parallel.tensor_model_parallel_size")
    device = device_index(env.local_rank, torch.cuda.device_count()) if torch.cuda.is_available() else None
    os.environ.update(launcher_vars(env, device))
    if device is not None:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=p.timeout_minutes)
    # Sub-groups made later by dist.new_group (ZeRO's, megatron's) take this default rather
    # than the timeout given to init_process_group; set it so none of them can wait forever.
    dist.distributed_c10d.default_pg_timeout = timeout
    if hasattr(dist.distributed_c10d, "default_pg_nccl_timeout"):
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(p), timeout=timeout, **_rendezvous(env, timeout))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        distributed_timeout_minutes=p.timeout_minutes,  # used as timedelta(minutes=...): a float is fine
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return env


def _rendezvous(env: DistEnv, timeout: datetime.timedelta) -> dict:
    """init_process_group's rendezvous arguments: env:// except for workers on torchrun's agent store.

    The agent keeps its store across `--max-restarts` (and across rendezvous rounds of multi-node
    elastic jobs), so restarted workers would read the dead workers' gloo/nccl addresses and fail
    to connect. Their keys go under a prefix that only this attempt's workers share.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {"init_method": "env://"}
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    prefix = attempt_prefix(store, env.rank, env.world_size, timeout)
    return {"store": dist.PrefixStore(prefix, store), "rank": env.rank, "world_size": env.world_size}


def attempt_prefix(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A store prefix agreed by every worker of this attempt and used by no earlier one.

    TORCHELASTIC_RESTART_COUNT is not it: on a multi-node job a healthy node restarts its
    workers without counting a restart. Instead each worker appends a fresh nonce to a log in the
    store; rank 0 answers every nonce it reads with its own fresh token, and waits until each rank
    has joined under that token. A stale nonce from a dead attempt gets an answer nobody reads.
    Rank 0 reads only the log's new entries, so a poll costs O(new workers), not O(world size).
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"drope/hello/{store.add('drope/hellos', 1)}", nonce)
        token = store.get(f"drope/reply/{nonce}").decode()  # waits up to the store's timeout
        store.add(f"drope/{token}/joined", 1)
        return f"drope/{token}/"
    token, counted, unread = uuid.uuid4().hex, 0, set()
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"drope/{token}/joined", 0) < world_size - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank joined within {timeout}: check that all {world_size} started")
        total = store.add("drope/hellos", 0)
        unread.update(range(counted + 1, total + 1))
        counted = total
        # An entry counted but not written yet (its worker between add and set, or killed there) waits.
        for i in [i for i in unread if store.check([f"drope/hello/{i}"])]:
            store.set(f"drope/reply/{store.get(f'drope/hello/{i}').decode()}", token)
            unread.discard(i)
        time.sleep(0.02)
    return f"drope/{token}/"


def shutdown(process_group: bool = True) -> None:
    """Leave the job: megatron's groups first, then the default group (unless a caller's, kept for it)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(p: ParallelConfig | None = None, seed: int = 1234, single: bool = False):
    """Be part of the job for the duration of a block, yielding this rank's DistEnv.

    Reuses a job already set up with the same TP/PP (a test's, a caller's) and leaves it up;
    otherwise initialises and shuts down. `single=True` insists on a world of one process
    (offline tools such as conversion).
    """
    p = p or ParallelConfig()
    owned = not parallel_state.model_parallel_is_initialized()
    callers = dist.is_initialized()  # a process group the caller set up stays up after the block
    if owned:
        env = _joined() if callers else discover()
    else:
        layout = (parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size())
        if layout != (p.tensor_model_parallel_size, p.pipeline_model_parallel_size):
            raise ConfigError(f"this process already runs TP={layout[0]} PP={layout[1]}; "
                              f"asked for TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}")
        env = DistEnv(dist.get_rank(), dist.get_world_size(), 0, "", 0, "existing")
    try:
        if owned:  # inside: a rank failing here (its GPU, its backend) must end an MPI job too
            initialize(p, seed, env)
        if single and env.world_size != 1:
            raise ConfigError("this tool runs in a single process: start it without torchrun/srun/mpirun")
        yield env
    except BaseException as exc:
        if owned and env.launcher == "mpi" and env.world_size > 1:
            _abort_mpi_job(exc)
        raise
    finally:
        if owned:
            shutdown(process_group=not callers)


def _abort_mpi_job(exc: BaseException) -> None:
    """A rank that fails under mpirun ends the whole job. Otherwise MPI's finalize at its exit waits
    for the other ranks, which wait in a collective for this one until the job's timeout (torchrun
    and srun end a job whose process fails by themselves)."""
    from mpi4py import MPI

    code = getattr(exc, "exit_code", None)  # an expected failure (bad input, diverged): one line, its status
    if code is not None:
        print(f"drope: error: {exc}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc)
        sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code or 1)
