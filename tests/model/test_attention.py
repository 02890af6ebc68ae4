"""SDPA core attention against megatron's own attention, the temperature hook and the mask."""

import math

import pytest
import torch

from drope_megatron.model.attention import SDPAttention
from tests.helpers import batch, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def logits(model, recipe, length=None):
    tokens, positions = batch(recipe, length=length)
    with torch.no_grad():
        return model(tokens, positions, None)


@pytest.mark.parametrize("extra", [
    ["model.phase=rope"],
    ["model.phase=drope"],
    ["model.num_query_groups=4"],  # MHA
    ["model.num_query_groups=1", "model.softmax_scale=0.3"],  # MQA with a fixed scale
    ["model.qk_norm=true"],
], ids=["rope-gqa", "drope-gqa", "mha", "mqa-scale", "qk-norm"])
def test_sdpa_matches_megatron_attention(extra):
    sdpa, recipe = tiny_model(*extra)
    reference, _ = tiny_model(*extra, "model.attention_backend=megatron")
    assert type(reference.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    ours, theirs = logits(sdpa, recipe), logits(reference, recipe)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_softmax_scale_changes_the_output():
    default, recipe = tiny_model()
    scaled, _ = tiny_model("model.softmax_scale=1.0")
    assert (logits(default, recipe) - logits(scaled, recipe)).abs().max() > 1e-3


def test_log_length_temperature_is_one_inside_training_context():
    plain, recipe = tiny_model("model.phase=drope")
    hot, _ = tiny_model("model.phase=drope", "model.attention_temperature=log_length")
    n = recipe.model.seq_length
    torch.testing.assert_close(logits(hot, recipe, n), logits(plain, recipe, n), rtol=0, atol=0)
    long_plain, long_hot = logits(plain, recipe, 4 * n), logits(hot, recipe, 4 * n)
    torch.testing.assert_close(long_hot[:, :n], long_plain[:, :n], rtol=0, atol=0)
    assert (long_hot[:, n:] - long_plain[:, n:]).abs().max() > 1e-4


def test_length_factors_follow_log_ratio():
    core = hot_core(train_length=16)
    f = core.length_factors(64, 64, "cpu")
    assert torch.all(f[:16] == 1.0)
    assert f[63].item() == pytest.approx(math.log(64) / math.log(16))
    # With a cache the queries are the last positions: their factors are the tail of the full ones.
    torch.testing.assert_close(core.length_factors(4, 64, "cpu"), f[-4:])
    # fp32 whatever the model's dtype: in bf16, 1.003 (position 4199, trained at 4096) would round to 1.
    assert hot_core(train_length=4096).length_factors(1, 4200, "cpu").item() == pytest.approx(1.00302, abs=1e-5)


@pytest.mark.parametrize("queries", [32, 5])  # a whole sequence; the last queries over a cache
def test_log_length_temperature_is_attention_with_each_query_scaled(queries):
    """softmax(f_i q_i k^T / sqrt(d)) v with f_i = max(1, log(i + 1) / log(L)), written out here."""
    core, length, train = hot_core(train_length=8), 32, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 1, 4, 16, generator=gen) for n in (queries, length, length))
    pos = torch.arange(length - queries, length, dtype=torch.float64)
    f = torch.clamp(torch.log(pos + 1) / math.log(train), min=1.0)
    scores = torch.einsum("qhd,khd->hqk", q[:, 0].double() * f[:, None, None], k[:, 0].double()) / math.sqrt(16)
    scores = scores.masked_fill(torch.arange(length)[None, :] > pos[:, None], float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[:, 0].double()).reshape(queries, 1, 64)
    torch.testing.assert_close(core(q, k, v, None).double(), expected, rtol=0, atol=1e-5)


def hot_core(train_length):
    model, _ = tiny_model()
    config = model.config
    return SDPAttention(config, layer_number=1, temperature="log_length", train_length=train_length)


def test_queries_shorter_than_keys_attend_bottom_right():
    model, _ = tiny_model()
    core = SDPAttention(model.config, layer_number=1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, heads, 16, generator=gen) for heads in (4, 2, 2))
    full = core(q, k, v, None)
    tail = core(q[-3:], k, v, None)
    torch.testing.assert_close(tail, full[-3:], rtol=0, atol=1e-6)


def test_explicit_megatron_mask_is_honoured():
    model, _ = tiny_model()
    core = SDPAttention(model.config, layer_number=1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 1, heads, 16, generator=gen) for heads in (4, 2, 2))
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)  # megatron: True = masked
    torch.testing.assert_close(core(q, k, v, causal), core(q, k, v, None), rtol=0, atol=1e-6)
    # a mask that also hides key 0 from every query after the first must change those outputs only
    hidden = causal.clone()
    hidden[1:, 0] = True
    out = core(q, k, v, hidden)
    torch.testing.assert_close(out[:1], core(q, k, v, None)[:1], rtol=0, atol=1e-6)
    expected = core(q[1:], k[1:], v[1:], None)  # queries 1.. over keys 1.. only, causally
    torch.testing.assert_close(out[1:], expected, rtol=0, atol=1e-5)
