"""Attention pieces: a self-attention that can skip RoPE per layer, and an SDPA core.

`DropeSelfAttention` is megatron-core's `SelfAttention` with one switch, `use_rope`; the
model flips it when its phase changes. `SDPAttention` replaces the local spec's
`DotProductAttention` (which materialises the [b, np, sq, sk] score matrix) with
`torch.nn.functional.scaled_dot_product_attention`, whose fused kernels keep memory
linear in sequence length.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class DropeSelfAttention(SelfAttention):
    """Megatron self-attention whose rotary embedding can be switched off on a live model."""

    use_rope: bool = True

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if not self.use_rope:
            rotary_pos_emb = None
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class SDPAttention(MegatronModule):
    """Causal core attention through PyTorch SDPA, with an optional length-aware temperature.

    Takes megatron's layout (query [sq, b, np, hn], key/value [sk, b, ng, hn]) and returns
    [sq, b, np * hn], like `DotProductAttention`. With `temperature="log_length"` the query at
    absolute position i is scaled by max(1, log(i + 1) / log(train_length)): logits sharpen
    past the training context, as entropy-invariant attention proposes; 1 inside it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        temperature: str = "none",
        train_length: int = 0,
    ):
        super().__init__(config=config)
        if temperature not in ("none", "log_length"):
            raise ValueError(f"unknown attention temperature {temperature!r}")
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.temperature = temperature
        self.train_length = train_length

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.temperature == "log_length":
            # The factor in fp32: in bf16 it moves in steps of 2^-7, so just past the training length
            # it would be exactly 1 for every query (the product is still rounded to q's dtype).
            q = (q.float() * self.length_factors(sq, sk, q.device).view(1, 1, sq, 1)).to(q.dtype)
        mask, causal = self._mask(attention_mask, sq, sk, q.device)
        groups = np_ // k.shape[1]
        # SDPA's own GQA runs in the flash kernels only (half precision, no mask); elsewhere it would
        # fall back to the kernel that builds every score, so the key/value heads are repeated instead.
        native_gqa = q.dtype in (torch.float16, torch.bfloat16) and mask is None
        if groups > 1 and not native_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=k.shape[1] != np_,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def length_factors(self, sq: int, sk: int, device) -> torch.Tensor:
        """max(1, log(pos + 1) / log(train_length)) in fp32, for the sq queries ending at position sk - 1."""
        pos = torch.arange(sk - sq, sk, device=device, dtype=torch.float32)
        return (torch.log(pos + 1.0) / math.log(self.train_length)).clamp(min=1.0)

    @staticmethod
    def _mask(attention_mask, sq: int, sk: int, device):
        """SDPA wants True = attend; megatron passes True = masked out, or None for causal."""
        if attention_mask is not None:
            return ~attention_mask.bool(), False
        if sq == sk:
            return None, True
        # Queries are the last sq positions (decoding with a cache): align the causal edge there.
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq), False
