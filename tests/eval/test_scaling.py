"""RoPE-scaling baselines: our megatron rotary equals transformers' for PI / NTK / YaRN, and the
converted model's logits (hence perplexity) equal transformers' under each method."""

from __future__ import annotations

import math

import pytest
import torch

from drope_megatron.eval import scaling
from drope_megatron.eval.backends import HFBackend, MegatronBackend
from drope_megatron.eval.perplexity import perplexity
from tests.convert.hf_models import hf_config, save_hf_model

TRAIN = 64
METHODS = ("none", "pi", "ntk", "yarn")


def _plain(base: float, head_dim: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)


def _hf_angles(method: str, length: int, base: float, head_dim: int):
    """Angles position x inv_freq and the cos/sin factor that transformers' rope functions give."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def config(params):
        return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=TRAIN,
                           rope_parameters=params)

    params = scaling.hf_rope_parameters(method, base, head_dim, TRAIN, length)
    if method == "ntk":  # transformers' dynamic NTK at this length (the baseline as defined), not our formula
        dynamic = {"rope_type": "dynamic", "rope_theta": base, "factor": 1.0}
        inv_freq, factor = ROPE_INIT_FUNCTIONS["dynamic"](config(dynamic), None, seq_len=length)
        # Our HF backend passes the grown base as plain RoPE: the same frequencies.
        assert params["rope_type"] == "default"
        assert torch.allclose(_plain(params["rope_theta"], head_dim), inv_freq, rtol=1e-6)
    elif params["rope_type"] == "default":  # transformers computes plain RoPE inside each model class
        inv_freq, factor = _plain(params["rope_theta"], head_dim), 1.0
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config(params), None, seq_len=length)
    return torch.outer(torch.arange(length).float(), inv_freq), factor


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", [TRAIN, 3 * TRAIN, 8 * TRAIN])
def test_rotary_matches_transformers(megatron_world, method, length):
    from tests.helpers import tiny_model

    model, recipe = tiny_model(f"model.seq_length={TRAIN}", "model.rotary_base=10000")
    head_dim = recipe.model.head_dim
    rotary = scaling.rotary_for(method, 10000.0, head_dim, TRAIN, length)
    model.set_rotary(rotary.base, rotary.scaling)
    out = model.rotary_pos_emb(length)
    emb, mscale = out if isinstance(out, tuple) else (out, 1.0)
    ours = emb[:, 0, 0, : head_dim // 2].float()  # [s, 1, 1, dim]: angles, repeated halves
    theirs, factor = _hf_angles(method, length, 10000.0, head_dim)
    # Angles reach ~length radians: compare relative to their size (fp32 products).
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6 * length)
    assert math.isclose(mscale, factor, rel_tol=1e-6)
    if method != "none" and length > TRAIN:
        plain = torch.outer(torch.arange(length).float(), _plain(10000.0, head_dim))
        assert not torch.allclose(ours, plain)  # the method really stretched something


def test_no_method_stretches_rope_within_the_trained_length():
    for method in METHODS:
        for length in (TRAIN // 2, TRAIN):  # a factor below 1 would compress the trained positions
            assert scaling.rotary_for(method, 10000.0, 16, TRAIN, length) == scaling.rotary_for("none", 10000.0, 16,
                                                                                                 TRAIN, TRAIN)
    assert scaling.rotary_for("none", 10000.0, 16, TRAIN, TRAIN).scaling.type == "none"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from drope_megatron.convert.hf_to_megatron import convert

    root = tmp_path_factory.mktemp("scaling")
    save_hf_model(root / "hf", hf_config("llama", max_position_embeddings=TRAIN))
    convert(root / "hf", root / "meg", show_progress=False)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_perplexity_and_logits_equal_transformers(megatron_world, converted, method):
    length = 4 * TRAIN
    docs = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(0)).tolist()
    meg = MegatronBackend(converted / "meg", "float32", 1)
    hf = HFBackend(converted / "hf", "float32")
    for backend in (meg, hf):
        backend.use(method, length)
    ids = torch.tensor(docs)
    diff = (meg.logits(ids) - hf.logits(ids)).abs().max().item()
    assert diff < 1e-4, diff
    ours, theirs = perplexity(meg, docs, length)["ppl"], perplexity(hf, docs, length)["ppl"]
    assert abs(ours - theirs) / theirs < 1e-4
    # Back to plain RoPE: the baselines must not stick to the model.
    meg.use("none", length)
    hf.use("none", length)
    assert (meg.logits(ids) - hf.logits(ids)).abs().max().item() < 1e-4


def test_ntk_does_not_depend_on_what_was_evaluated_before(converted):
    """transformers' own dynamic NTK grows its base with the longest input seen so far; ours is
    fixed at the target length, as the Megatron side is."""
    hf = HFBackend(converted / "hf", "float32")
    hf.use("ntk", 4 * TRAIN)
    ids = torch.randint(3, 300, (1, 4 * TRAIN), generator=torch.Generator().manual_seed(1))
    short = hf.logits(ids[:, : 2 * TRAIN])
    hf.logits(ids)
    assert torch.equal(hf.logits(ids[:, : 2 * TRAIN]), short)
