"""Evaluation fixtures: a small real corpus (with its sentencepiece tokenizer) and two tiny
checkpoints on it, one RoPE and one DroPE, built once per session."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_recipe

TRAIN_LENGTH = 192
VOCAB = 1000


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from drope_megatron.data.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("eval_corpus") / "corpus", vocab_size=VOCAB, max_chars=400_000)


@pytest.fixture(scope="session")
def checkpoints(megatron_world, corpus, tmp_path_factory):
    """{"rope": path, "drope": path}: the same random weights saved in each phase, with the tokenizer."""
    from drope_megatron import checkpoint
    from drope_megatron.model import build_model

    root = tmp_path_factory.mktemp("eval_ckpts")
    recipe = tiny_recipe(f"model.vocab_size={VOCAB}", f"model.seq_length={TRAIN_LENGTH}",
                         "model.make_vocab_size_divisible_by=128")
    paths = {}
    for phase in ("rope", "drope"):
        torch.manual_seed(0)
        model = build_model(recipe.model, recipe.parallel)
        model.set_phase(phase)
        paths[phase] = checkpoint.save(model, recipe.model, root / phase, tokenizer=corpus / "tokenizer.model")
    return paths
