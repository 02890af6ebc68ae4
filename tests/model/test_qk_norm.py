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


def test_full_width_norm_compiles_under_tensor_parallel(tmp_path):
    """The TP all-reduce returned its input through two autograd functions: torch.compile refused
    it (a view modified in place), so compiled layers with the QK-norm failed at TP>1."""
    from tests.helpers import torchrun

    proc = torchrun(2, ["tests/workers/qk_norm_probe.py", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    norm = FullWidthRMSNorm(tiny_model("model.qk_norm=true")[0].config, hidden_size=16, num_heads=4)
    x = torch.randn(5, 2, 4, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = norm(x)
    weights = torch.cat([torch.arange(y[:, :, 2 * r:2 * r + 2].numel()).view(5, 2, 2, 16) for r in (0, 1)], dim=2)
    (y * weights).sum().backward()
    for kind in ("eager", "compiled"):
        torch.testing.assert_close(torch.cat([r[kind][0] for r in ranks], dim=2), y.detach())
        # Summed in another order across the ranks: float32 rounding of gradients up to ~300.
        torch.testing.assert_close(torch.cat([r[kind][1] for r in ranks], dim=2), x.grad, rtol=1e-5, atol=1e-5)
