"""Under torchrun: load a Megatron checkpoint into a ZeRO-3 partitioned model in DTYPE and compare
every parameter (gathered) with an unpartitioned load cast to the same dtype; save it back from
the partitions to OUT's sibling `saved`; rank 0 writes what it found to OUT."""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from drope_megatron import checkpoint, distributed
from drope_megatron.config import ParallelConfig, TrainConfig
from drope_megatron.train.engine import deepspeed_config
from drope_megatron.train.zero3 import load_partitioned, sharded_for_save


def main(ckpt: Path, out: Path, dtype: str) -> None:
    env = distributed.initialize(ParallelConfig())
    precision = "bf16" if dtype == "bfloat16" else "fp32"  # zero.Init casts every parameter to it
    config = deepspeed_config(TrainConfig(zero_stage=3, micro_batch_size=1, global_batch_size=env.world_size,
                                          precision=precision), env.world_size)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny parameters
    model, _ = load_partitioned(ckpt, ParallelConfig(), config, dtype=dtype)
    reference, _ = checkpoint.load_model(ckpt, ParallelConfig(), dtype=dtype)
    full = dict(reference.named_parameters())
    local = total = 0
    worst = 0.0
    for name, param in model.named_parameters():
        local += param.ds_tensor.numel()
        total += param.ds_numel
        with deepspeed.zero.GatheredParameters([param]):
            assert param.dtype == getattr(torch, dtype), (name, param.dtype)
            worst = max(worst, (param.data - full[name].data.to(param.dtype)).abs().max().item())
    length = checkpoint.model_config(ckpt).seq_length
    rotary_equal = torch.equal(model.rotary_pos_emb(length), reference.rotary_pos_emb(length))
    checkpoint.save(model, checkpoint.model_config(ckpt), out.with_name("saved"), sharded=sharded_for_save(
        model, checkpoint.model_config(ckpt), ParallelConfig()))
    if env.rank == 0:
        out.write_text(json.dumps({"local": local, "total": total, "max_abs_diff": worst,
                                   "names": len(full), "world_size": env.world_size,
                                   "rotary_equal": rotary_equal}))
    distributed.shutdown()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
