"""CPU shims: active without CUDA, and megatron's RNG tracker forks the CPU generator cleanly."""

import torch

from drope_megatron import compat


def test_shims_apply_exactly_when_cuda_is_absent():
    applied = compat.apply_cpu_shims()
    assert applied is (not torch.cuda.is_available())
    if applied:
        assert torch.device(torch.cuda.current_device()).type == "cpu"
        torch.cuda.synchronize()  # a no-op, not an error
    else:
        assert isinstance(torch.cuda.current_device(), int)  # real CUDA left alone


def test_tracker_fork_is_reproducible_and_leaves_outer_stream_alone():
    tracker = compat.CpuRNGStatesTracker()
    tracker.add("model-parallel", 7)
    torch.manual_seed(0)
    expected_outer = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_outer)
    with tracker.fork("model-parallel"):
        second = torch.rand(3)  # the forked stream continues where it stopped
    fresh = torch.Generator().manual_seed(7)
    assert torch.equal(first, torch.rand(3, generator=fresh)) and torch.equal(second, torch.rand(3, generator=fresh))


def test_causal_mask_is_built_on_cpu():
    from megatron.core.transformer import utils

    compat.apply_cpu_shims()
    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_kernel_fusions_only_where_cuda_is():
    from drope_megatron.model.build import transformer_config
    from tests.helpers import tiny_recipe

    for requested in (True, False):
        for dtype in ("float32", "bfloat16"):
            recipe = tiny_recipe(f"model.fused_kernels={str(requested).lower()}", f"model.params_dtype={dtype}")
            config = transformer_config(recipe.model, recipe.parallel)
            on = requested and torch.cuda.is_available()
            assert config.bias_activation_fusion is on
            # Megatron's fused cross-entropy returns bf16 gradients: never under an fp32 model.
            assert config.cross_entropy_loss_fusion is (on and dtype == "bfloat16")
            # The fusions that need Transformer Engine or apex stay off everywhere.
            assert not (config.apply_rope_fusion or config.gradient_accumulation_fusion or config.persist_layer_norm)
