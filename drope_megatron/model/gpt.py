"""`DropeGPTModel`: megatron-core's GPTModel whose positional phase is a property of the model.

The rotary module is always built (it has no parameters, so keys never change); the phase
decides whether `GPTModel._preprocess` computes rotary embeddings at all ("none" when no
layer uses them) and which layers' attention applies them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron.core.models.gpt import GPTModel

from drope_megatron.config import PHASES


def rope_flags(phase: str, num_layers: int, rope_layers: Optional[Sequence[int]] = None) -> list[bool]:
    """Which of the num_layers layers (0-based) apply RoPE in `phase`."""
    if phase not in PHASES:
        raise ValueError(f"unknown positional phase {phase!r}: use one of {', '.join(PHASES)}")
    if phase == "rope":
        return [True] * num_layers
    if phase == "drope":
        return [False] * num_layers
    if not rope_layers:
        raise ValueError("phase 'layers' needs rope_layers, the 0-based layers that keep RoPE")
    bad = [i for i in rope_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"rope_layers {bad} are outside 0..{num_layers - 1}")
    return [i in set(rope_layers) for i in range(num_layers)]


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
