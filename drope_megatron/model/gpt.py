"""`DropeGPTModel`: megatron-core's GPTModel whose positional phase is a property of the model.

The rotary module is always built (it has no parameters, so keys never change); the phase
decides whether `GPTModel._preprocess` computes rotary embeddings at all ("none" when no
layer uses them) and which layers' attention applies them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron.core.models.gpt import GPTModel

from drope_megatron.config import rope_flags


class DropeGPTModel(GPTModel):
    """GPTModel with `set_phase("rope" | "drope" | "layers", rope_layers)`."""

    def __init__(self, *args, phase: str = "rope", rope_layers: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # The rotary flavour the model was built with ("rope" or "yarn"), restored when RoPE returns.
        self.rope_type = self.position_embedding_type
        self.set_phase(phase, rope_layers)

    def set_phase(self, phase: str, rope_layers: Optional[Sequence[int]] = None) -> None:
        flags = rope_flags(phase, self.config.num_layers, rope_layers)
        for layer in self.decoder.layers:
            layer.self_attention.use_rope = flags[layer.layer_number - 1]
        self.position_embedding_type = self.rope_type if any(flags) else "none"
        self.phase = phase
        self.rope_layers = [i for i, f in enumerate(flags) if f]
