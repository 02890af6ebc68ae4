"""The demo's training mixture: the retrieval share of tokens, retrieval documents shorter than the
context and ending in EOS, and a rebuild exactly when a setting changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drope_megatron.demo import mixture
from drope_megatron.demo.pipeline import SHIPPED
from drope_megatron.data.tokenizer import load_tokenizer

SEQ = 256  # the demo's context: a retrieval prompt needs about 90 tokens
TOKENIZER = SHIPPED / "tokenizer.model"


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "corpus.json").write_text(json.dumps({"sources": ["test"]}))
    lines = [f"Line {i} of a play, in which the king speaks to the fool about the weather." for i in range(400)]
    docs = ["\n".join(lines[k:k + 40]) for k in range(0, 400, 40)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


def _read(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    return [np.array(data[i]) for i in range(len(data))]  # copies: the views die with the file's mapping


def test_retrieval_share_lengths_and_eos(corpus, tmp_path):
    out = tmp_path / "data"
    prefixes = mixture.build(corpus, TOKENIZER, out, SEQ, retrieval_share=0.3)
    prose, retrieval = _read(prefixes["prose"]), _read(prefixes["retrieval"])
    tokens = [sum(len(d) for d in docs) for docs in (prose, retrieval)]
    assert tokens[1] / sum(tokens) == pytest.approx(0.3, abs=0.05)
    eos = load_tokenizer(TOKENIZER).eos_id
    assert len(prose) == 10 and all(d[-1] == eos for d in prose)
    assert all(d[-1] == eos and SEQ // 2 - 16 <= len(d) <= SEQ + 1 for d in retrieval)
    assert len({len(d) for d in retrieval}) > 1  # lengths vary across the range
    from drope_megatron.eval import tasks

    texts = [load_tokenizer(TOKENIZER).decode(d.tolist()) for d in retrieval]  # every training task, alternating
    kinds = [("passkey" if tasks.PASSKEY_INTRO in t else "niah" if tasks.NIAH_INTRO in t else "?") for t in texts]
    assert kinds.count("passkey") - kinds.count("niah") in (0, 1) and "?" not in kinds
    counts = json.loads((out / "mixture.json").read_text())["counts"]
    assert (counts["prose"]["tokens"], counts["retrieval"]["tokens"]) == tuple(tokens)


def test_rebuilt_exactly_when_a_setting_changes(corpus, tmp_path):
    out = tmp_path / "data"
    mixture.build(corpus, TOKENIZER, out, SEQ, retrieval_share=0.3)
    assert mixture.is_built(corpus, TOKENIZER, out, SEQ, 0.3)
    stamp = (out / "retrieval.bin").stat().st_mtime_ns
    mixture.build(corpus, TOKENIZER, out, SEQ, retrieval_share=0.3)
    assert (out / "retrieval.bin").stat().st_mtime_ns == stamp  # reused
    for changed in [dict(seq_length=2 * SEQ), dict(retrieval_share=0.5), dict(seed=1)]:
        args = {"seq_length": SEQ, "retrieval_share": 0.3, **changed}
        assert not mixture.is_built(corpus, TOKENIZER, out, args["seq_length"], args["retrieval_share"],
                                    changed.get("seed", 0))
    copy = tmp_path / "tokenizer.model"  # the tokenizer is told by its content, not by its path
    copy.write_bytes(TOKENIZER.read_bytes())
    mixture.build(corpus, copy, out, SEQ, retrieval_share=0.3)
    assert mixture.is_built(corpus, copy, out, SEQ, 0.3)
    copy.write_bytes(TOKENIZER.read_bytes() + b"\0")
    assert not mixture.is_built(corpus, copy, out, SEQ, 0.3)
    before = sum(len(d) for d in _read(str(out / "retrieval")))
    mixture.build(corpus, TOKENIZER, out, SEQ, retrieval_share=0.5)
    assert sum(len(d) for d in _read(str(out / "retrieval"))) > before


def test_a_rebuild_stopped_halfway_is_not_taken_for_either_build(corpus, tmp_path, monkeypatch):
    """Other settings rewrite prose.bin first: stopped there, the old manifest must not vouch for it."""
    out = tmp_path / "data"
    mixture.build(corpus, TOKENIZER, out, SEQ, retrieval_share=0.3)
    real_write = mixture.write_indexed

    def stop_at_retrieval(docs, prefix, vocab_size):
        if str(prefix).endswith("retrieval"):
            raise KeyboardInterrupt
        return real_write(docs, prefix, vocab_size)

    monkeypatch.setattr(mixture, "write_indexed", stop_at_retrieval)  # an interrupt at a known point
    with pytest.raises(KeyboardInterrupt):
        mixture.build(corpus, TOKENIZER, out, 2 * SEQ, retrieval_share=0.3)
    assert not mixture.is_built(corpus, TOKENIZER, out, SEQ, 0.3)
