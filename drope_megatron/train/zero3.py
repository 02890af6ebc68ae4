"""ZeRO-3 models in and out of Megatron checkpoints without any rank holding the whole model.

Loading: the model is built already partitioned (`deepspeed.zero.Init`: each data-parallel rank
keeps 1/dp of every parameter), then the dist checkpoint is read one parameter at a time: the
parameter is gathered, filled from the checkpoint, and partitioned again from rank 0's copy.
Saving: parameters are dealt out round-robin to the data-parallel ranks; each is gathered in
turn and kept only by its rank, which writes it as the main replica. A rank holds its
partitions, one gathered parameter, and 1/dp of the whole parameters. The checkpoint keys come
from a copy of the model built on the meta device, which costs no memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from drope_megatron import checkpoint
from drope_megatron.config import ModelConfig, ParallelConfig


def load_partitioned(path: str | Path, p: ParallelConfig, ds_config: dict, add_qk_norm: bool = False,
                     attention: dict | None = None, dtype: str | None = None):
    """(model partitioned for ZeRO-3 with the checkpoint's weights, its ModelConfig); `add_qk_norm`,
    `attention` and `dtype` as in `checkpoint.load_model`."""
    import deepspeed

    from drope_megatron.model import build_model
    from drope_megatron.train.engine import MegatronMPU

    m, new_norms, weights = checkpoint.prepare(path, p, dtype, add_qk_norm=add_qk_norm, attention=attention)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # reuses our group
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=MegatronMPU(),
                             data_parallel_group=parallel_state.get_data_parallel_group()):
        model = build_model(m, p, initialize=False)
    # zero.Init casts every float tensor made inside it to the run's dtype, the rotary table too (a
    # plain attribute): bf16 positions and frequencies would garble RoPE. Built again outside it.
    model.set_rotary(m.rotary_base, m.rope_scaling)
    keys, offset = checkpoint.sharded_keys(m, p), checkpoint.layer_offset(model)
    for name, param in model.named_parameters():
        if new_norms and name.endswith(checkpoint.NEW_NORMS):
            continue  # not in the checkpoint: keeps its initial value of 1
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            # In the dtype zero.Init gave the parameter (bf16 norms too): megatron checks the two agree.
            changes = {"data": torch.empty_like(param.data)}
            if hasattr(keys[name], "dtype"):  # a ShardedTensor; a factory (fused SwiGLU) takes the data's
                changes["dtype"] = param.dtype
            spec = dataclasses.replace(keys[name], **changes)
            param.data.copy_(checkpoint.load_sharded({name: spec}, weights, False, offset)[name])
    return model, m


def sharded_for_save(model, m: ModelConfig, p: ParallelConfig) -> dict:
    """This rank's share of the whole parameters, as the sharded state dict `checkpoint.save` writes."""
    import deepspeed

    keys = checkpoint.sharded_keys(m, p)
    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    params = dict(model.named_parameters())
    # Non-parameter entries (layers' `_extra_state` objects) as the model describes them.
    mine = {key: spec for key, spec in keys.items() if key not in params}
    for i, (name, param) in enumerate(params.items()):
        with deepspeed.zero.GatheredParameters([param]):
            if i % size == rank:
                spec = keys[name]
                # replica_id is (pipeline, tensor, data) rank: this rank is the one writer of the piece
                replica = (*spec.replica_id[:-1], 0) if isinstance(spec.replica_id, tuple) else 0
                # A host copy: on a GPU, 1/dp of the model would otherwise stay there until the save ends.
                changes = {"data": param.data.detach().to("cpu", copy=True), "replica_id": replica}
                if hasattr(spec, "dtype"):  # a ShardedTensor; a factory (fused SwiGLU) takes the data's
                    changes["dtype"] = param.dtype
                mine[name] = dataclasses.replace(spec, **changes)
    return mine
