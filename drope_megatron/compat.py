"""megatron-core CPU shims: the only place that knows megatron-core 0.16 assumes CUDA.

`apply_cpu_shims()` is a no-op when CUDA is present. Without CUDA it patches the CUDA-only
spots measured on CPU machines: the current-device lookup used for buffers
and pipeline messages, the model-parallel RNG tracker, the default causal mask,
`torch.cuda.synchronize` in the checkpoint writer and pipeline p2p, the token counter the
pipeline schedules allocate with `device="cuda"`, and `Tensor.cuda()` used when the last
pipeline stage copies the tied embedding (an identity here: without CUDA it could only fail).
`kernel_fusions()` likewise switches megatron's fused kernels on only where CUDA is present.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer import utils as transformer_utils

_applied = False


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """Megatron's RNG tracker, keeping named states of the CPU generator instead of CUDA's."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _CpuTorch(types.ModuleType):
    """`torch` as seen by megatron's pipeline schedules: tensors asked for on "cuda" land on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def kernel_fusions(requested: bool, dtype: torch.dtype) -> dict:
    """TransformerConfig fusion flags: on CUDA, the fusions megatron-core runs without Transformer
    Engine or apex, compiled by torch.compile: SwiGLU (any dtype), and cross-entropy for bf16 models
    only (its backward hands back bf16 logit gradients whatever the model's dtype). None on the CPU,
    where the compile would cost more than the kernels save."""
    on = requested and torch.cuda.is_available()
    return dict(bias_activation_fusion=on, cross_entropy_loss_fusion=on and dtype is torch.bfloat16,
                cross_entropy_fusion_impl="native", bias_dropout_fusion=False, masked_softmax_fusion=False,
                apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU-only runs; returns True when the shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # fused_softmax imported the function by name, so both references are replaced.
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    schedules.torch = _CpuTorch("torch")
    _applied = True
    return True
