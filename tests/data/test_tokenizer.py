"""A Hugging Face tokenizer that puts a BOS before every text (Llama, Gemma) gets it before every
training document and every evaluation prompt; one that adds nothing gets nothing."""

from __future__ import annotations

import json
import random

import pytest

from drope_megatron.config import DataConfig
from drope_megatron.data.documents import documents
from drope_megatron.data.tokenizer import load_tokenizer
from drope_megatron.eval.tasks import make_sample

WORDS = ["<unk>", "<s>", "</s>", *sorted(set(
    "there is an important info hidden inside a lot of irrelevant text find it and memorize them i will quiz you "
    "about the information what pass key remember grass green sky blue sun yellow here we go back again".split())),
    *"0123456789.?:"]


def _save(folder, adds_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            do_lower_case=True).save_pretrained(str(folder))
    return load_tokenizer(folder)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_bos_starts_documents_and_prompts_when_the_tokenizer_adds_one(tmp_path, adds_bos):
    tok = _save(tmp_path / "tok", adds_bos)
    assert tok.bos == ((1,) if adds_bos else ())
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "the sky is blue"}) + "\n")
    doc = next(documents(DataConfig(paths=[str(tmp_path / "docs.jsonl")], format="json"), tok, 0, 0))
    assert doc == [*tok.bos, *tok.encode("the sky is blue"), tok.eos_id] and doc.count(1) == int(adds_bos)
    sample = make_sample("passkey", tok, 120, 0.5, random.Random(0))
    assert (sample.prompt[0] == 1) is adds_bos and sample.prompt.count(1) == int(adds_bos)
    assert 110 < len(sample.prompt) + len(sample.answer) <= 120
