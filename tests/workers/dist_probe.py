"""Joins a job through drope_megatron.distributed, all-reduces, writes what it found to OUT/rank<N>.json.

`stall` mode: rank 1 freezes before the collective, so rank 0 must give up within the
recipe's timeout, on a group made by plain `dist.new_group` (as ZeRO makes its groups).
`diverge` mode: rank 1's training diverges inside `distributed.session` while rank 0 waits in a
collective; `fail_init`: rank 1 fails while joining (a backend it cannot use). `joined` mode: the
process group is set up before, and the launcher's variables are gone, as when a caller runs its
own init_process_group.
"""

import os

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from drope_megatron import distributed
from drope_megatron.config import ParallelConfig


def fail(mode: str, p: ParallelConfig) -> None:
    """Rank 1 fails inside a session while rank 0 waits: in a collective, or in the rendezvous."""
    if mode == "fail_init" and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        p = ParallelConfig(tensor_model_parallel_size=p.tensor_model_parallel_size, backend="nccl",
                           timeout_minutes=p.timeout_minutes)
    with distributed.session(p) as env:
        if env.rank == 1:
            from drope_megatron.train.loop import TrainingDiverged  # imports DeepSpeed: seconds, so only here

            raise TrainingDiverged("probe: rank 1 diverges")
        dist.all_reduce(torch.ones(1))


def main(mode: str, tp: int, timeout_minutes: float, out: Path) -> None:
    p = ParallelConfig(tensor_model_parallel_size=tp, timeout_minutes=timeout_minutes)
    if mode in ("fail_init", "diverge"):
        return fail(mode, p)
    if mode == "joined":  # a session joins the caller's group, and leaves it up for the caller
        dist.init_process_group("gloo")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
            os.environ.pop(key, None)
        with distributed.session(p) as env:
            report(env, mode, out)
        # After the session: its own groups are gone, the caller's is there.
        kept = dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
        path = out / f"rank{env.rank}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "group_kept": kept}))
        dist.destroy_process_group()
        return
    env = distributed.initialize(p)
    report(env, mode, out)
    distributed.shutdown()


def report(env, mode: str, out: Path) -> None:
    group = dist.new_group(list(range(env.world_size)))
    if mode == "stall" and env.rank == 1:
        time.sleep(600)
    value = torch.tensor([env.rank + 1.0])
    dist.all_reduce(value, group=group)
    tp_value = torch.tensor([1.0])
    dist.all_reduce(tp_value, group=parallel_state.get_tensor_model_parallel_group())
    found = json.dumps({"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                      "launcher": env.launcher, "sum": value.item(), "tp_sum": tp_value.item(),
                      "tp_rank": parallel_state.get_tensor_model_parallel_rank()})
    (out / f"rank{env.rank}.json").write_text(found)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
