"""The weight map between Megatron (local spec) and Hugging Face Llama-style names.

Each rule pairs one Megatron tensor with the Hugging Face tensors it is made of and a
transform: `copy`, `qkv` (per query group: its query heads, its key head, its value head),
`cat` (linear_fc1 = [gate; up]) or `vocab` (rows padded to the TP-aligned vocabulary).
Megatron's non-interleaved rotary matches Hugging Face's rotate_half: no q/k permutation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

L = "model.layers.{i}."
RULES = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "vocab"),
    ("decoder.layers.{i}.input_layernorm.weight", (L + "input_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_qkv.bias",
     (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"), "qkv"),
    ("decoder.layers.{i}.self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", (L + "post_attention_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), "cat"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), "copy"),
)
_PATTERNS = [(re.compile("^" + re.escape(m).replace(r"\{i\}", r"(\d+)") + "$"), m, hf, how) for m, hf, how in RULES]


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the attention layout and the vocabulary."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int

    @classmethod
    def of(cls, m, padded_vocab: int) -> "Shapes":
        """From a ModelConfig and the padded vocabulary its checkpoint uses."""
        return cls(heads=m.num_attention_heads, groups=m.groups, head_dim=m.head_dim, vocab=m.vocab_size,
                   padded_vocab=padded_vocab)


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]
    how: str


def mapping_for(megatron_name: str) -> Mapping:
    """The rule for one Megatron tensor name, with the layer index filled in."""
    for pattern, _, hf, how in _PATTERNS:
        match = pattern.match(megatron_name)
        if match:
            i = match.group(1) if match.groups() else None
            return Mapping(megatron_name, tuple(h.format(i=i) for h in hf), how)
    raise KeyError(f"no Hugging Face mapping for Megatron tensor {megatron_name}")


def to_megatron(how: str, parts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    if how == "copy":
        return parts[0]
    if how == "cat":
        return torch.cat(parts, dim=0)
    if how == "vocab":
        pad = s.padded_vocab - parts[0].shape[0]
        return torch.cat([parts[0], parts[0].new_zeros(pad, *parts[0].shape[1:])]) if pad else parts[0]
    if how == "qkv":
        q, k, v = parts
        rest = q.shape[1:]
        per_group = s.heads // s.groups * s.head_dim
        grouped = torch.cat([q.reshape(s.groups, per_group, *rest), k.reshape(s.groups, s.head_dim, *rest),
                             v.reshape(s.groups, s.head_dim, *rest)], dim=1)
        return grouped.reshape(-1, *rest)
    raise ValueError(f"unknown transform {how}")


def to_hf(how: str, tensor: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    if how == "copy":
        return [tensor]
    if how == "cat":
        return list(tensor.chunk(2, dim=0))
    if how == "vocab":
        return [tensor[: s.vocab]]
    if how == "qkv":
        rest = tensor.shape[1:]
        per_group = s.heads // s.groups * s.head_dim
        grouped = tensor.reshape(s.groups, per_group + 2 * s.head_dim, *rest)
        q, k, v = grouped.split([per_group, s.head_dim, s.head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(f"unknown transform {how}")


def expected_hf_shapes(how: str, megatron_shape: tuple[int, ...], s: Shapes) -> list[tuple[int, ...]]:
    """The shapes the Hugging Face parts must have for a Megatron tensor of this shape."""
    meta = torch.empty(megatron_shape, device="meta")
    return [tuple(t.shape) for t in to_hf(how, meta, s)]
