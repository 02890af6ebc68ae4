"""The paper's QK-norm: one RMS over the full q (and k) width, weights starting at 1."""

import pytest
import torch

from drope_megatron.model.qk_norm import FullWidthRMSNorm
from tests.helpers import batch, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def test_norm_is_rms_over_full_width():
    model, _ = tiny_model("model.qk_norm=true")
    norm = model.decoder.layers[0].self_attention.q_layernorm
    assert isinstance(norm, FullWidthRMSNorm)
    assert torch.equal(norm.weight, torch.ones(4 * 16))
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
    x = torch.randn(5, 2, 4, 16)
    flat = x.reshape(5, 2, 64)
    expected = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected.view(5, 2, 4, 16))
    per_head = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert (norm(x) / norm.weight.view(4, 16) - per_head).abs().max() > 1e-2  # not megatron's per-head norm


def test_qk_norm_weights_have_full_width_keys():
    model, recipe = tiny_model("model.qk_norm=true")
    sd = model.state_dict()
    assert sd["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (4 * 16,)
    assert sd["decoder.layers.0.self_attention.k_layernorm.weight"].shape == (2 * 16,)
    plain, _ = tiny_model()
    extra = set(sd) - set(plain.state_dict())
    assert extra == {f"decoder.layers.{i}.self_attention.{n}_layernorm.weight" for i in range(2) for n in "qk"}


def test_qk_norm_changes_the_function_and_trains():
    model, recipe = tiny_model("model.qk_norm=true")
    plain, _ = tiny_model()
    tokens, positions = batch(recipe)
    with torch.no_grad():
        assert (model(tokens, positions, None) - plain(tokens, positions, None)).abs().max() > 1e-3
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    grad = model.decoder.layers[0].self_attention.q_layernorm.weight.grad
    assert grad is not None and grad.abs().sum() > 0
