"""Tiny real transformers models for conversion tests: built from configs, random weights, saved locally."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 32},  # head_dim != hidden / heads, as in real Qwen3
    "smollm3": {"num_hidden_layers": 4},  # default no_rope_layers: RoPE in 3 of every 4 layers
}


def hf_config(family: str, gqa: bool = True, tied: bool = False, **overrides):
    """A tiny config; its norm epsilon is far from every default, so a lost epsilon shows in the logits."""
    from transformers import CONFIG_MAPPING

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, max_position_embeddings=128, tie_word_embeddings=tied,
                  rms_norm_eps=0.05, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(FAMILY_EXTRAS[family])
    kwargs.update(overrides)
    return CONFIG_MAPPING[family](**kwargs)


def save_hf_model(folder: Path, cfg, dtype=torch.float32, seed: int = 0):
    """Random weights with norms and biases moved off their init, so a mapping mistake shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(str(folder))
    return model


def megatron_logits(ckpt: Path, tokens: torch.Tensor, dtype: str | None = None) -> torch.Tensor:
    from drope_megatron import distributed
    from drope_megatron.config import ParallelConfig
    from drope_megatron import checkpoint
    from drope_megatron.model.pipeline import forward_logits

    with distributed.session(single=True):
        model, m = checkpoint.load_model(ckpt, ParallelConfig(), gather_logits=True, dtype=dtype)
        return forward_logits(model.eval(), tokens)[..., : m.vocab_size]
