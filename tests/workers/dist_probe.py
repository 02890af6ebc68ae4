"""Joins a job through drope_megatron.distributed, all-reduces, writes what it found to OUT/rank<N>.json.

`stall` mode: rank 1 freezes before the collective, so rank 0 must give up within the
recipe's timeout, on a group made by plain `dist.new_group` (as ZeRO makes its groups).
`fail` mode: rank 1 raises inside `distributed.session` while rank 0 waits in a collective.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from drope_megatron import distributed
from drope_megatron.config import ConfigError, ParallelConfig


def main(mode: str, tp: int, timeout_minutes: float, out: Path) -> None:
    if mode == "fail":  # rank 1 fails inside a session while rank 0 waits in a collective
        with distributed.session(ParallelConfig(tensor_model_parallel_size=tp, timeout_minutes=timeout_minutes)) as env:
            if env.rank == 1:
                raise ConfigError("probe: rank 1 fails")
            dist.all_reduce(torch.ones(1))
        return
    env = distributed.initialize(ParallelConfig(tensor_model_parallel_size=tp, timeout_minutes=timeout_minutes))
    group = dist.new_group(list(range(env.world_size)))
    if mode == "stall" and env.rank == 1:
        time.sleep(600)
    value = torch.tensor([env.rank + 1.0])
    dist.all_reduce(value, group=group)
    tp_value = torch.tensor([1.0])
    dist.all_reduce(tp_value, group=parallel_state.get_tensor_model_parallel_group())
    report = json.dumps({"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                      "launcher": env.launcher, "sum": value.item(), "tp_sum": tp_value.item(),
                      "tp_rank": parallel_state.get_tensor_model_parallel_rank()})
    (out / f"rank{env.rank}.json").write_text(report)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
