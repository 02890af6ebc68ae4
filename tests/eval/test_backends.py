"""Evaluation backends on model families with their own rotary set-ups: baselines stretch only the
scaling, keep the rest (partial rotary), and plain RoPE comes back exactly; a model that already
has a RoPE scaling is evaluated as it is. Logits of the last positions only, and losses taken in
chunks, equal the whole computation."""

from __future__ import annotations

import pytest
import torch

from drope_megatron.config import ConfigError, EvalConfig
from drope_megatron.eval import runner
from drope_megatron.eval.backends import HFBackend
from drope_megatron.eval.perplexity import token_losses
from tests.eval.conftest import VOCAB

TRAIN = 32


def _save(folder, family: str, vocab_size: int = 100, positions: int = TRAIN, **extra):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cfg = CONFIG_MAPPING[family](vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=positions, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])  # partial rotary: 50 % and 25 % of each head
def test_baselines_keep_partial_rotary_and_plain_rope_returns(tmp_path, family):
    backend = HFBackend(_save(tmp_path / family, family, partial_rotary_factor=0.5 if family == "phi" else 0.25),
                        "float32")
    ids = torch.randint(0, 100, (1, 4 * TRAIN), generator=torch.Generator().manual_seed(0))
    plain = backend.logits(ids)
    assert torch.allclose(backend.logits(ids, keep=3), plain[:, -3:], atol=1e-5)  # the output layer on 3 only
    whole = torch.nn.functional.cross_entropy(plain[0, :-1], ids[0, 1:], reduction="none")
    assert torch.allclose(token_losses(backend, ids[0].tolist(), chunk=5), whole, atol=1e-5)
    frequencies = backend.model.base_model.rotary_emb.inv_freq.numel()
    r = backend.rotary_dim  # the rotated part of each 16-wide head
    assert r == {"phi": 8, "gpt_neox": 4}[family] == 2 * frequencies
    for method in ("pi", "ntk", "yarn"):
        backend.use(method, 4 * TRAIN)
        inv_freq = backend.model.base_model.rotary_emb.inv_freq
        assert inv_freq.numel() == frequencies
        if method == "ntk":  # the base grown for the rotated width, not the head's
            grown = backend.base * 4.0 ** (r / (r - 2))
            assert torch.allclose(inv_freq, 1.0 / grown ** (torch.arange(0, r, 2).float() / r), rtol=1e-6)
        assert not torch.allclose(backend.logits(ids), plain)
        backend.use("none", 4 * TRAIN)
        assert torch.equal(backend.logits(ids), plain)


def test_an_already_scaled_model_is_evaluated_as_it_is(tmp_path, corpus):
    folder = _save(tmp_path / "scaled", "llama", vocab_size=VOCAB,
                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    backend = HFBackend(folder, "float32")
    assert backend.scaled == "linear"
    with pytest.raises(ConfigError, match="already uses linear RoPE scaling"):
        backend.use("pi", 4 * TRAIN)
    (folder / "tokenizer.model").write_bytes((corpus / "tokenizer.model").read_bytes())
    e = EvalConfig(lengths=["256"], tasks=["passkey"], baselines=["pi", "yarn"], depths=[0.5], samples=1)
    results = runner.run({"scaled": folder}, e, tmp_path / "report", progress=False)
    assert list(results["rows"]) == ["scaled"] and results["models"]["scaled"]["rope_scaling"] == "linear"


def test_megatron_backend_runs_the_output_layer_on_kept_positions_only(checkpoints):
    from drope_megatron.eval.backends import MegatronBackend

    backend = MegatronBackend(checkpoints["rope"], "float32", 1)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = backend.model.output_layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    plain, kept = backend.logits(ids), backend.logits(ids, keep=3)
    handle.remove()
    assert seen == [40, 3] and kept.shape == (1, 3, VOCAB)
    torch.testing.assert_close(kept, plain[:, -3:])
    assert torch.equal(backend.logits(ids), plain)  # the slicing hook is gone afterwards


def test_a_model_without_rope_is_evaluated_without_baselines(tmp_path, corpus, capsys):
    folder = _save(tmp_path / "gpt2", "gpt2", vocab_size=VOCAB, positions=256)  # learned absolute positions
    (folder / "tokenizer.model").write_bytes((corpus / "tokenizer.model").read_bytes())
    e = EvalConfig(lengths=["256"], tasks=["passkey"], baselines=["pi"], depths=[0.5], samples=1)
    results = runner.run({"gpt2": folder}, e, tmp_path / "report", progress=True)
    assert list(results["rows"]) == ["gpt2"] and results["models"]["gpt2"]["phase"] == "other"
    assert "gpt2 has no RoPE; baselines are run on plain RoPE models only" in capsys.readouterr().err


def test_baselines_a_model_cannot_take_are_refused_before_any_evaluation(tmp_path, corpus):
    # GPT-J's rotary table is fixed at its 32 positions and reads no rope_parameters: before, the
    # plain pass ran first and only then did the baseline fail.
    folder = _save(tmp_path / "gptj", "gptj", vocab_size=VOCAB, rotary_dim=8)
    (folder / "tokenizer.model").write_bytes((corpus / "tokenizer.model").read_bytes())
    e = EvalConfig(lengths=["32"], tasks=["passkey"], baselines=["pi"], depths=[0.5], samples=1)
    with pytest.raises(ConfigError, match="no shared rotary module that reads rope_parameters"):
        runner.run({"gptj": folder}, e, tmp_path / "report", progress=False)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("family", ["gpt2", "gptj"])  # a learned table; a fixed sin/cos one
def test_lengths_past_a_table_of_positions_are_refused_before_any_evaluation(tmp_path, corpus, family):
    """Indexing past the table failed with an IndexError (a device assert on CUDA), after the
    shorter lengths had run; a RoPE model beside it is not limited."""
    extra = {"rotary_dim": 8} if family == "gptj" else {}
    folder = _save(tmp_path / family, family, vocab_size=VOCAB, positions=64, **extra)
    rope = _save(tmp_path / "llama", "llama", vocab_size=VOCAB, positions=64)
    e = EvalConfig(lengths=["1x", "2x"], tasks=["passkey"], depths=[0.5], samples=1)
    with pytest.raises(ConfigError, match=f"{family} .* holds a table of 64 positions, so it cannot run at 128"):
        runner.run({"llama": rope, family: folder}, e, tmp_path / "report", progress=False)
    assert not (tmp_path / "report").exists()
    assert runner._check_lengths("llama", rope, e, ["passkey"]) is None


def test_an_alibi_falcon_is_no_rope_model(tmp_path, corpus, capsys):
    """Falcon builds a rotary module even under ALiBi, and applies it only without: its baseline
    rows were copies of the plain one. Fewer long documents than asked for are said."""
    folder = _save(tmp_path / "falcon", "falcon", vocab_size=VOCAB, positions=256, alibi=True)
    (folder / "tokenizer.model").write_bytes((corpus / "tokenizer.model").read_bytes())
    e = EvalConfig(lengths=["256"], tasks=["ppl"], baselines=["pi"], data=[str(corpus / "valid.jsonl")],
                   documents=1000)
    results = runner.run({"falcon": folder}, e, tmp_path / "report", progress=True)
    assert results["models"]["falcon"]["phase"] == "other" and list(results["rows"]) == ["falcon"]
    assert (tmp_path / "report" / "results.json").is_file()
    used = results["rows"]["falcon"]["ppl"]["256"]["documents"]
    assert 0 < used < 1000 and f"only {used} of the 1000 documents asked for hold 256 tokens" in capsys.readouterr().err


def test_a_config_without_a_training_context_is_refused_in_one_line(tmp_path):
    """Bloom names no max_position_embeddings (ALiBi has no limit): lengths like 2x have nothing to multiply."""
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=1, n_head=4)).save_pretrained(
        str(tmp_path / "bloom"))
    with pytest.raises(ConfigError, match="BloomConfig names no max_position_embeddings"):
        runner._check_lengths("bloom", tmp_path / "bloom", EvalConfig(lengths=["2x"]), ["ppl"])
