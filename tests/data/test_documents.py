"""Documents of an epoch in their seeded order, from any document on (how a resume skips ahead)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drope_megatron.config import DataConfig
from drope_megatron.data.documents import documents
from drope_megatron.data.indexed import write_indexed
from drope_megatron.data.tokenizer import Tokenizer

CHARS = Tokenizer(lambda text: [ord(c) for c in text], lambda ids: "".join(map(chr, ids)), 0, 256, "chars")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    texts = [f"document {i} " + "x" * i for i in range(12)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_indexed(([ord(c) for c in t] for t in texts), str(folder / "docs"), 256)
    return {"json": DataConfig(paths=[str(folder / "docs.jsonl")], format="json"),
            "megatron": DataConfig(paths=[str(folder / "docs")], format="megatron")}


@pytest.mark.parametrize("kind", ["json", "megatron"])
def test_an_epoch_from_a_later_document_is_the_rest_of_the_same_order(sources, kind):
    d = sources[kind]

    def read(epoch, start=0):
        return [np.asarray(doc).tolist() for doc in documents(d, CHARS, epoch, seed=5, start=start)]

    whole = read(1)
    assert len(whole) == 12 and read(1, start=7) == whole[7:]
    assert read(2) != whole and sorted(map(tuple, read(2))) == sorted(map(tuple, whole))  # reshuffled per epoch
