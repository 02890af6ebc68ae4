"""A model with SmolLM-135M's exact shapes (random bf16 weights) round-trips."""

import json

import pytest
import torch
from safetensors import safe_open

from drope_megatron.convert.hf_to_megatron import convert
from drope_megatron.convert.megatron_to_hf import export
from tests.convert.hf_models import megatron_logits

pytestmark = pytest.mark.usefixtures("megatron_world")

SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def test_smollm_135m_shapes_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM_135M), dtype=torch.bfloat16)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    model.save_pretrained(str(tmp_path / "hf"))
    del model
    convert(tmp_path / "hf", tmp_path / "meg", show_progress=False)
    export(tmp_path / "meg", tmp_path / "out", show_progress=False)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == torch.bfloat16 and torch.equal(x, y), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 3
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(megatron_logits(tmp_path / "meg", tokens, dtype="float32"), theirs, rtol=0, atol=1e-4)
