"""Supported Hugging Face architecture families, declared as data.

A family says what its checkpoints carry beyond the Llama layout: qkv biases (Qwen2),
per-head q/k norms (Qwen3), per-layer NoPE (SmolLM3). Adding a Llama-like family is one
entry here and a test.
"""

from __future__ import annotations

from dataclasses import dataclass

from drope_megatron.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the transformers class written on export
    model_types: tuple[str, ...]
    qkv_bias: bool = False
    qk_head_norm: bool = False
    per_layer_nope: bool = False  # config.no_rope_layers: 1 = RoPE, 0 = NoPE (SmolLM3's polarity)
    sliding_window: bool = False  # the config may ask for sliding-window attention


FAMILIES = (
    Family("llama", "LlamaForCausalLM", ("llama",)),  # Llama 2/3, SmolLM 1/2
    Family("mistral", "MistralForCausalLM", ("mistral",), sliding_window=True),
    Family("qwen2", "Qwen2ForCausalLM", ("qwen2",), qkv_bias=True, sliding_window=True),
    Family("qwen3", "Qwen3ForCausalLM", ("qwen3",), qk_head_norm=True, sliding_window=True),
    Family("smollm3", "SmolLM3ForCausalLM", ("smollm3",), per_layer_nope=True, sliding_window=True),
)
NOPE_EXPORT = next(f for f in FAMILIES if f.name == "smollm3")


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"unsupported architecture model_type={model_type!r}: supported are {known}")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"unknown architecture family {name!r}")
