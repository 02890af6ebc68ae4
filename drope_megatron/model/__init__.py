"""The DroPE model: megatron-core's GPT with an explicit, switchable positional phase.

`build_model(model_cfg, parallel_cfg)` returns a `DropeGPTModel`; `model.set_phase("drope")`
removes RoPE from every layer of a live model, `"rope"` puts it back, `"layers"` keeps it
only in selected layers. Checkpoint keys are the same in every phase.
"""

from drope_megatron.model.build import build_model, transformer_config
from drope_megatron.model.gpt import DropeGPTModel

__all__ = ["DropeGPTModel", "build_model", "transformer_config"]
