"""The weight transforms: QKV grouping, gated MLP, vocabulary padding, the name map."""

import pytest
import torch

from drope_megatron.convert import tensors

S = tensors.Shapes(heads=4, groups=2, head_dim=3, vocab=10, padded_vocab=16)


def test_qkv_is_grouped_query_heads_then_key_then_value():
    h = 5
    q = torch.arange(4 * 3 * h, dtype=torch.float32).reshape(12, h)
    k = 1000 + torch.arange(2 * 3 * h, dtype=torch.float32).reshape(6, h)
    v = 2000 + torch.arange(2 * 3 * h, dtype=torch.float32).reshape(6, h)
    qkv = tensors.to_megatron("qkv", [q, k, v], S)
    assert qkv.shape == (24, h)
    # group 0: query heads 0-1, key head 0, value head 0; then group 1
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(qkv, expected)
    back = tensors.to_hf("qkv", qkv, S)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 1), (8, 2)])
def test_qkv_round_trip_weights_and_biases(heads, groups):
    s = tensors.Shapes(heads=heads, groups=groups, head_dim=2, vocab=1, padded_vocab=1)
    for rest in [(7,), ()]:
        parts = [torch.randn(heads * 2, *rest), torch.randn(groups * 2, *rest), torch.randn(groups * 2, *rest)]
        back = tensors.to_hf("qkv", tensors.to_megatron("qkv", parts, s), s)
        assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, parts))


def test_gate_up_and_vocab():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = tensors.to_megatron("cat", [gate, up], S)
    assert torch.equal(fc1[:6], gate) and torch.equal(tensors.to_hf("cat", fc1, S)[1], up)
    emb = torch.randn(10, 4)
    padded = tensors.to_megatron("vocab", [emb], S)
    assert padded.shape == (16, 4) and torch.all(padded[10:] == 0)
    assert torch.equal(tensors.to_hf("vocab", padded, S)[0], emb)


def test_name_map():
    rule = tensors.mapping_for("decoder.layers.12.self_attention.linear_qkv.bias")
    assert rule.how == "qkv" and rule.hf[1] == "model.layers.12.self_attn.k_proj.bias"
    assert tensors.mapping_for("output_layer.weight").hf == ("lm_head.weight",)
    with pytest.raises(KeyError, match="no Hugging Face mapping"):
        tensors.mapping_for("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    assert tensors.expected_hf_shapes("qkv", (24, 5), S) == [(12, 5), (6, 5), (6, 5)]
