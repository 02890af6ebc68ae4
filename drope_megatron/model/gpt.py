"""`DropeGPTModel`: megatron-core's GPTModel whose positional phase is a property of the model.

The rotary module is always built (it has no parameters, so keys never change); the phase
decides whether `GPTModel._preprocess` computes rotary embeddings at all ("none" when no
layer uses them) and which layers' attention applies them. `set_rotary` swaps the rotary
frequencies (plain, PI, NTK base, YaRN, Llama 3) on a live model, which is how evaluation
runs the RoPE-scaling baselines on the same weights.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.models.gpt import GPTModel

from drope_megatron.config import RopeScalingConfig, rope_flags

# Megatron attention reads YaRN's attention factor from these config attributes (MLA declares
# them; a plain TransformerConfig carries them only while the model runs YaRN).
_YARN_KEYS = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "correction_range_round_to_int")


class DropeGPTModel(GPTModel):
    """GPTModel with `set_phase("rope" | "drope" | "layers", rope_layers)` and `set_rotary`."""

    def __init__(self, *args, phase: str = "rope", rope_layers: Optional[Sequence[int]] = None,
                 rotary_base: float = 10000.0, rope_scaling: Optional[RopeScalingConfig] = None, **kwargs):
        super().__init__(*args, position_embedding_type="rope", rotary_base=rotary_base, **kwargs)
        self.set_rotary(rotary_base, rope_scaling or RopeScalingConfig())
        self.set_phase(phase, rope_layers)

    def set_phase(self, phase: str, rope_layers: Optional[Sequence[int]] = None) -> None:
        flags = rope_flags(phase, self.config.num_layers, rope_layers)
        for layer in self.decoder.layers:
            layer.self_attention.use_rope = flags[layer.layer_number - 1]
        self.position_embedding_type = self.rope_type if any(flags) else "none"
        self.phase = phase
        self.rope_layers = [i for i, f in enumerate(flags) if f]

    def compile_layers(self) -> None:
        """torch.compile each transformer layer in place, as torchtitan compiles blocks: one
        graph per layer shape, compiled once and reused by every layer; parameter names (and so
        checkpoints) stay as they are. Compile after `set_phase`: a phase change recompiles."""
        _trace_warnings_as_no_ops()
        for layer in self.decoder.layers:
            layer.compile()

    def set_rotary(self, rotary_base: float, scaling: RopeScalingConfig) -> None:
        """Rebuild the rotary frequencies: base `rotary_base` stretched by `scaling` (megatron's own
        RotaryEmbedding / YarnRotaryEmbedding; the phase decides whether they are applied)."""
        config = self.config
        for key in _YARN_KEYS:
            if hasattr(config, f"yarn_{key}"):
                delattr(config, f"yarn_{key}")
        common = dict(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
                      rotary_base=rotary_base, use_cpu_initialization=config.use_cpu_initialization,
                      cp_group=self.pg_collection.cp)
        if scaling.type == "yarn":
            values = dict(rotary_scaling_factor=scaling.factor, beta_fast=scaling.beta_fast,
                          beta_slow=scaling.beta_slow,
                          original_max_position_embeddings=scaling.original_max_position_embeddings,
                          mscale=1.0, mscale_all_dim=0.0, correction_range_round_to_int=True)
            for key, value in values.items():
                setattr(config, f"yarn_{key}", value)
            rotary = YarnRotaryEmbedding(
                **common, scaling_factor=scaling.factor, beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                original_max_position_embeddings=scaling.original_max_position_embeddings)
        else:
            rotary = RotaryEmbedding(
                **common, seq_len_interpolation_factor=scaling.factor if scaling.type == "linear" else None)
            if scaling.type == "llama3":
                # GPTModel's rope_scaling flag hard-codes Llama 3.1's factors and 8192 context; use the
                # recipe's values through the same megatron routine.
                rotary.inv_freq = rotary._apply_scaling(
                    rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                    high_freq_factor=scaling.high_freq_factor,
                    original_max_position_embeddings=scaling.original_max_position_embeddings)
        old = getattr(self, "rotary_pos_emb", None)
        if hasattr(getattr(type(old), "forward", None), "cache_clear"):
            # megatron caches its tables in a class-level lru_cache keyed on the instance: without
            # this the replaced instance's tables (64 MiB each at 128k positions) would stay alive.
            type(old).forward.cache_clear()
        self.rotary_pos_emb = rotary
        self.rope_type = "yarn" if scaling.type == "yarn" else "rope"
        if getattr(self, "phase", None) is not None:
            self.position_embedding_type = self.rope_type if self.rope_layers else "none"


@functools.cache
def _trace_warnings_as_no_ops() -> None:
    """Inside compiled code, `warnings.warn` does nothing. megatron-core 0.16's row-parallel
    linear passes `tp_group=None`, and the lookup that follows warns (on rank 0) with arguments
    dynamo can neither trace nor defer: each layer's graph broke in two places. Without the
    warning a layer is one graph, shared by all layers. Outside compiled code warnings are as before."""
    import _warnings

    import torch

    @torch._dynamo.substitute_in_graph(_warnings.warn)
    def warn(message, category=None, stacklevel=1, source=None):
        return None
