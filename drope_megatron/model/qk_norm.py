"""Q/K norms that stay right under tensor parallelism.

`FullWidthRMSNorm` is the paper's QK-norm: one RMS over all num_heads * head_dim values of a
token, not per head. Each TP rank holds a slice of the heads, so the sum of squares is
all-reduced across the TP group, with an all-reduce in backward too (each rank's heads
contribute to the shared RMS).

`HeadRMSNorm` is the per-head norm over head_dim (Qwen3's, megatron's `qk_layernorm`). Its
weight is whole on every rank while each rank normalises only its own heads, so the weight's
gradient is summed over the TP group. Megatron sums it in its own gradient finalisation, which
a DeepSpeed engine does not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group in forward and in backward (reduce-then-copy composes exactly that).
    The clone: both functions return their input itself, which torch.compile refuses once the
    all-reduce has written into it."""
    return copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(x).clone())


class FullWidthRMSNorm(MegatronModule):
    """RMSNorm of [s, b, heads_local, head_dim] over all heads of all TP ranks; weight starts at 1."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, num_heads: int = 0):
        super().__init__(config=config)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        if num_heads <= 0 or num_heads % self.tp:
            raise ValueError(f"FullWidthRMSNorm: {num_heads} heads cannot be split over TP={self.tp}")
        self.head_dim = hidden_size
        self.local_heads = num_heads // self.tp
        self.full_width = num_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_heads * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            sum_sq = tp_all_reduce(sum_sq)
        xf = xf * torch.rsqrt(sum_sq / self.full_width + self.eps)
        # Same order as Hugging Face's RMSNorm: normalise in fp32, cast, then scale.
        return self.weight.view(self.local_heads, self.head_dim) * xf.to(x.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class HeadRMSNorm(torch.nn.RMSNorm):
    """RMSNorm of [..., head_dim] per head, as megatron's local spec builds it, with its weight's
    gradient summed over the TP group in backward (a copy into the TP region does that)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight) if self.tp > 1 else self.weight
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)
