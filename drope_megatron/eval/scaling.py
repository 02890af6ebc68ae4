"""RoPE-scaling baselines as data: what rotary base and stretch each method uses at a target length.

Each method maps (model base, head dim, training length, target length) to a rotary base and a
`RopeScalingConfig` that the Megatron model applies with `set_rotary`, and to the equivalent
transformers `rope_parameters` for Hugging Face models. The factor is always target / training
length; at or below the training length every method is plain RoPE.

- `pi`: position interpolation (transformers `linear`).
- `ntk`: NTK-aware scaling at the factor s, as Dynamic NTK reaches it at the target length (the
  YaRN paper's definition; transformers' `dynamic` with its own factor at 1): the base grows to
  base * s ** (d / (d - 2)), d the rotary dimension, so the slowest rotation stretches by s. (Its
  `dynamic` with factor s would grow it by (s^2 - s + 1) ** (d / (d - 2)): 57x at 8x, not 8x.)
  Both backends use that fixed base: transformers' own `dynamic` would recompute it from the
  longest input seen so far, so a prompt's result would depend on what was evaluated before it.
- `yarn`: YaRN with beta_fast 32, beta_slow 1 and attention factor 0.1 ln(factor) + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drope_megatron.config import ConfigError, RopeScalingConfig

BASELINES = ("pi", "ntk", "yarn")


@dataclass(frozen=True)
class Rotary:
    """The rotary set-up one method uses at one length."""

    base: float
    scaling: RopeScalingConfig


def factor(train_length: int, length: int) -> float:
    return max(1.0, length / train_length)


def rotary_for(method: str, base: float, head_dim: int, train_length: int, length: int) -> Rotary:
    """Rotary base and stretch of `method` ("none" or a baseline) at `length` tokens."""
    s = factor(train_length, length)
    if method == "none" or s == 1.0:
        return Rotary(base, RopeScalingConfig())
    if method == "pi":
        return Rotary(base, RopeScalingConfig(type="linear", factor=s))
    if method == "ntk":
        grown = base * s ** (head_dim / (head_dim - 2))
        return Rotary(grown, RopeScalingConfig())
    if method == "yarn":
        return Rotary(base, RopeScalingConfig(type="yarn", factor=s, original_max_position_embeddings=train_length))
    raise ConfigError(f"unknown baseline {method!r}: use one of {', '.join(BASELINES)}")


def hf_rope_parameters(method: str, base: float, rotary_dim: int, train_length: int, length: int) -> dict[str, Any]:
    """transformers `rope_parameters` for the same method; `rotary_dim` is the rotated part of a
    head (head_dim x partial_rotary_factor)."""
    s = factor(train_length, length)
    if method == "none" or s == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    if method == "ntk":
        return {"rope_type": "default", "rope_theta": rotary_for(method, base, rotary_dim, train_length, length).base}
    kind = {"pi": "linear", "yarn": "yarn"}[method]
    params = {"rope_type": kind, "rope_theta": base, "factor": s}
    if method == "yarn":
        params.update(original_max_position_embeddings=train_length, beta_fast=32.0, beta_slow=1.0)
    return params
