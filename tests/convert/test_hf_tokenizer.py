"""An export's bare sentencepiece tokenizer becomes one `AutoTokenizer` reads and that encodes alike."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from drope_megatron.config import ConfigError
from drope_megatron.convert.hf_tokenizer import copy_tokenizer
from drope_megatron.data.tokenizer import load_tokenizer
from drope_megatron.eval.tasks import make_sample

SHIPPED = Path(__file__).resolve().parents[2] / "drope_megatron" / "demo" / "pretrained" / "tokenizer.model"


def test_bare_sentencepiece_becomes_an_auto_tokenizer_that_encodes_alike(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(SHIPPED.read_bytes())
    (tmp_path / "out").mkdir()
    copy_tokenizer(tmp_path / "ckpt", tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"tokenizer.model", "tokenizer.json",
                                                                "tokenizer_config.json"}
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in config
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SHIPPED))
    assert (hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (sp.eos_id(), sp.bos_id(), sp.unk_id())
    sample = make_sample("niah_single", load_tokenizer(SHIPPED), 300, 0.5, random.Random(0))
    texts = [sp.decode(sample.prompt), "ACT I.\n\nSCENE  1.   Elsinore.\tA platform", "naïve café 東京 🙂 \x07"]
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert hf.decode(ids) == sp.decode(ids)


def test_a_hugging_face_tokenizer_is_copied_as_it_is(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text('{"tokenizer_class": "Mine"}')
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(b"not read")
    copy_tokenizer(tmp_path / "ckpt", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"tokenizer_class": "Mine"}'
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_an_unreadable_sentencepiece_model_is_refused_in_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="cannot convert"):
        copy_tokenizer(tmp_path / "ckpt", tmp_path / "out")
