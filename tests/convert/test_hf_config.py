"""Hugging Face configs read into ours: RoPE scaling values as transformers itself reads them."""

from __future__ import annotations

import math

import torch

from drope_megatron.convert.families import family_for
from drope_megatron.convert.hf_config import model_config_from_hf
from tests.convert.hf_models import hf_config


def test_null_yarn_betas_are_transformers_defaults():
    """transformers reads a null beta_fast / beta_slow as 32 / 1; a float(None) traceback it is not."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": None,
               "beta_slow": None}
    cfg = hf_config("llama", rope_scaling=scaling)
    m = model_config_from_hf(cfg, family_for(cfg.model_type))
    assert (m.rope_scaling.type, m.rope_scaling.beta_fast, m.rope_scaling.beta_slow) == ("yarn", 32.0, 1.0)


def test_a_null_yarn_factor_is_the_context_growth_as_transformers_reads_it():
    """DeepSeek-V3-style: factor null, the growth from original_max_position_embeddings to max_position_embeddings."""
    from transformers import LlamaForCausalLM

    scaling = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32}
    cfg = hf_config("llama", rope_scaling=scaling, max_position_embeddings=128)
    m = model_config_from_hf(cfg, family_for(cfg.model_type))
    assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_position_embeddings) == \
        ("yarn", 4.0, 32)
    # transformers' own attention factor for that model is YaRN's 0.1 * ln(4) + 1: the same factor.
    rotary = LlamaForCausalLM(cfg).model.rotary_emb
    assert abs(rotary.attention_scaling - (0.1 * math.log(4.0) + 1)) < 1e-6


def test_export_keeps_the_source_reach_unless_training_changed_the_context():
    """A YaRN model's table reaches past its training context and goes back as it came; a model trained
    at another length says that length, which eval reads as the HF model's training length."""
    import dataclasses

    from drope_megatron.convert.hf_config import hf_config_for_export, source_record
    from drope_megatron.convert.families import family_for as family

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    for cfg, trained in ((hf_config("llama", rope_scaling=scaling), 32), (hf_config("llama"), 128)):
        m = model_config_from_hf(cfg, family(cfg.model_type))
        source = source_record(cfg, family(cfg.model_type))
        assert m.seq_length == trained
        same, _ = hf_config_for_export(m, "source", source, torch.float32)
        assert same.max_position_embeddings == 128
        longer, _ = hf_config_for_export(dataclasses.replace(m, seq_length=256), "source", source, torch.float32)
        assert longer.max_position_embeddings == 256
