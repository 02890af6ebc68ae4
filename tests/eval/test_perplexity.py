"""Perplexity by length against transformers' own loss, the per-position curve against the
per-token losses, and the long-document selection (file order, cut to length, a clear error)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from drope_megatron.config import ConfigError
from drope_megatron.eval.backends import HFBackend
from drope_megatron.eval.perplexity import long_documents, perplexity, token_losses
from drope_megatron.data.tokenizer import Tokenizer
from tests.convert.hf_models import hf_config, save_hf_model

CHARS = Tokenizer(lambda text: [ord(c) for c in text], lambda ids: "".join(map(chr, ids)), 0, 256, "chars")
LENGTH = 40


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    save_hf_model(root / "hf", hf_config("llama", max_position_embeddings=LENGTH))
    return HFBackend(root / "hf", "float32")


def test_perplexity_is_exp_of_transformers_mean_loss(backend):
    docs = torch.randint(3, 300, (3, LENGTH + 5), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(backend, docs, LENGTH, bins=4)
    with torch.no_grad():  # transformers shifts the labels itself: an independent mean loss per document
        losses = [backend.model(torch.tensor([d[:LENGTH]]), labels=torch.tensor([d[:LENGTH]])).loss.item()
                  for d in docs]
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert (result["documents"], result["tokens"], result["bin_width"]) == (3, 3 * (LENGTH - 1), 10)
    per_token = torch.stack([token_losses(backend, d[:LENGTH]) for d in docs]).mean(0)
    assert len(result["position_loss"]) == 4
    assert result["position_loss"][0] == pytest.approx(per_token[:10].mean().item(), rel=1e-6)
    assert result["position_loss"][-1] == pytest.approx(per_token[30:].mean().item(), rel=1e-6)


def test_token_losses_in_chunks_equal_one_pass(backend):
    tokens = torch.randint(3, 300, (LENGTH,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = backend.logits(torch.tensor([tokens]))[0, :-1]
    whole = F.cross_entropy(logits.float(), torch.tensor(tokens[1:]), reduction="none")
    assert torch.allclose(token_losses(backend, tokens, chunk=7), whole, atol=1e-6)


def test_long_documents_are_the_first_long_enough_in_file_order_cut_to_length(tmp_path):
    texts = ["short", "a" * 30, "tiny", "b" * 50, "c" * 24, "d" * 40]  # "c" * 24 and its EOS: exactly 25
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    found = long_documents([str(path)], CHARS, min_tokens=25, limit=3)
    assert found == [[ord("a")] * 25, [ord("b")] * 25, [ord("c")] * 24 + [CHARS.eos_id]]
    assert len(long_documents([str(path)], CHARS, min_tokens=25, limit=10)) == 4
    # Each document ends in the tokenizer's EOS, which counts: the longest is 51 tokens.
    with pytest.raises(ConfigError, match=r"no document .* has 60 tokens \(the longest has 51\)"):
        long_documents([str(path)], CHARS, min_tokens=60, limit=3)
