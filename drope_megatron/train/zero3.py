"""Start ZeRO-3 training from a Megatron checkpoint without any rank holding the whole model.

The model is built already partitioned (`deepspeed.zero.Init`: each data-parallel rank keeps
1/dp of every parameter), then the dist checkpoint is read one parameter at a time: the
parameter is gathered, filled from the checkpoint, and partitioned again from rank 0's copy.
At any moment a rank holds its partitions plus one full parameter (of its TP shard). The
checkpoint keys come from a copy of the model built on the meta device, which costs no memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from drope_megatron import checkpoint
from drope_megatron.config import ModelConfig, ParallelConfig


def load_partitioned(path: str | Path, p: ParallelConfig, ds_config: dict, add_qk_norm: bool = False):
    """(model partitioned for ZeRO-3 with the checkpoint's weights, its ModelConfig)."""
    import deepspeed

    from drope_megatron.model import build_model
    from drope_megatron.train.engine import MegatronMPU

    m, new_norms, weights = checkpoint.prepare(path, p, add_qk_norm=add_qk_norm)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # reuses our group
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=MegatronMPU(),
                             data_parallel_group=parallel_state.get_data_parallel_group()):
        model = build_model(m, p, initialize=False)
    keys = _checkpoint_keys(m, p)
    for name, param in model.named_parameters():
        if new_norms and name.endswith(checkpoint.NEW_NORMS):
            continue  # not in the checkpoint: keeps its initial value of 1
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            spec = keys[name]
            spec.data = torch.empty_like(param.data)
            param.data.copy_(checkpoint.load_sharded({name: spec}, weights, whole=False)[name])
    return model, m


def _checkpoint_keys(m: ModelConfig, p: ParallelConfig) -> dict:
    """Each parameter's sharded-tensor description (global key, TP slice), from a meta-device model."""
    from drope_megatron.model import build_model

    with torch.device("meta"):
        layout = build_model(m, p, initialize=False)
    return layout.sharded_state_dict()
