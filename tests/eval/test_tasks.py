"""Retrieval prompts and scoring: one needle at the asked depth, prompts fitted to the length,
and exact-match scoring that agrees with real greedy decoding."""

from __future__ import annotations

import random

import pytest
import torch

from drope_megatron.config import ConfigError
from drope_megatron.data.tokenizer import load_tokenizer
from drope_megatron.eval import retrieval, tasks
from drope_megatron.eval.backends import MegatronBackend
from tests.eval.conftest import TRAIN_LENGTH


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(corpus / "tokenizer.model")


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_prompt_fits_length_and_needles_appear_once(tokenizer, task, length):
    for depth in (0.0, 0.3, 1.0):
        sample = tasks.make_sample(task, tokenizer, length, depth, random.Random(1))
        total = len(sample.prompt) + len(sample.answer)
        assert length - 8 <= total <= length, total
        text = tokenizer.decode(sample.prompt)
        for needle in sample.needles:
            assert text.count(needle) == 1, needle
        assert tokenizer.decode(sample.answer).strip() == sample.answer_text


@pytest.mark.parametrize("task", ["passkey", "niah_multikey", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_queried_needle_sits_at_the_depth(tokenizer, task, depth):
    sample = tasks.make_sample(task, tokenizer, 4096, depth, random.Random(2))
    text = tokenizer.decode(sample.prompt)
    start = text.index(tasks.FILLER[0])  # the haystack begins after the instruction
    end = max(text.rindex(f) + len(f) for f in tasks.FILLER)
    where = (text.index(sample.needles[0]) - start) / (end - start)
    assert abs(where - depth) < 0.02, where


@pytest.mark.parametrize("task", ["niah_multivalue", "vt"])
def test_chained_needles_follow_the_queried_one_in_order(tokenizer, task):
    # The answer lists the values (the chain's variables) in the needles' order: so must the text.
    for depth in (0.0, 0.5, 0.9):
        for seed in range(3):
            sample = tasks.make_sample(task, tokenizer, 2048, depth, random.Random(seed))
            text = tokenizer.decode(sample.prompt)
            where = [text.index(needle) for needle in sample.needles]
            assert where == sorted(where), (depth, seed)


def test_prompts_are_seeded(tokenizer):
    a = retrieval.samples("niah_single", tokenizer, 512, [0.5], 2, seed=3)
    b = retrieval.samples("niah_single", tokenizer, 512, [0.5], 2, seed=3)
    c = retrieval.samples("niah_single", tokenizer, 512, [0.5], 2, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt


def test_bad_requests_fail_clearly(tokenizer):
    with pytest.raises(ConfigError, match="cannot hold"):
        tasks.make_sample("niah_multiquery", tokenizer, 40, 0.5, random.Random(0))
    with pytest.raises(ConfigError, match="unknown retrieval task"):
        tasks.make_sample("summarise", tokenizer, 512, 0.5, random.Random(0))


def _greedy(backend, prompt: list[int], new_tokens: int) -> list[int]:
    """Real step-by-step greedy decoding, by full recomputation."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(backend.logits(torch.tensor([ids]), keep=1)[0, -1].argmax()))
    return ids[len(prompt):]


def test_scoring_agrees_with_greedy_decoding(checkpoints):
    backend = MegatronBackend(checkpoints["rope"], "float32", 1)
    for seed in range(3):
        sample = tasks.make_sample("passkey", backend.tokenizer, TRAIN_LENGTH, 0.5, random.Random(seed))
        generated = _greedy(backend, sample.prompt, 7)
        right = tasks.Sample("passkey", TRAIN_LENGTH, 0.5, sample.prompt, generated[:6], "")
        stops = not retrieval.continues(backend.tokenizer, generated[:6], generated[6])
        assert retrieval.score(backend, right) == (stops, generated)  # the 7th greedy token decides
        wrong = tasks.Sample("passkey", TRAIN_LENGTH, 0.5, sample.prompt, generated[:3] + [(generated[3] + 1) % 900] +
                             generated[4:], "")
        ok, predicted = retrieval.score(backend, wrong)
        assert not ok and predicted == generated[:4]


def test_evaluate_counts_exact_answers_overall_and_by_depth(checkpoints):
    """The model's own greedy output, where it stops a word, is an answer it gets right; the same
    with its first token changed, one it gets wrong. (A random model gets no real prompt right.)"""
    backend = MegatronBackend(checkpoints["rope"], "float32", 1)
    samples = []
    for seed in range(2):
        prompt = tasks.make_sample("passkey", backend.tokenizer, TRAIN_LENGTH, 0.0, random.Random(seed)).prompt
        out = _greedy(backend, prompt, 7)
        k = next(k for k in range(1, 7) if not retrieval.continues(backend.tokenizer, out[:k], out[k]))
        samples += [tasks.Sample("passkey", TRAIN_LENGTH, 0.0, prompt, out[:k], ""),
                    tasks.Sample("passkey", TRAIN_LENGTH, 1.0, prompt, [(out[0] + 1) % 900, *out[1:k]], ""),
                    # the needle found (its first token right), the answer longer than what the model says
                    tasks.Sample("passkey", TRAIN_LENGTH, 0.5, prompt, [*out[:k], (out[k] + 1) % 900], "")]
    result = retrieval.evaluate(backend, samples)
    assert (result["accuracy"], result["by_depth"], result["samples"]) == (2 / 6, {"0": 1.0, "0.5": 0.0, "1": 0.0}, 6)
    predictions = [retrieval.score(backend, s)[1] for s in samples]
    assert all(retrieval.found(backend.tokenizer, s, p) for s, p in zip(samples, predictions) if s.depth < 1)
    found = [retrieval.found(backend.tokenizer, s, p) for s, p in zip(samples, predictions)]
    assert result["found"] == sum(found) / 6 >= 4 / 6
    assert result["example"]["predicted"] == backend.tokenizer.decode(predictions[0]).strip()


def test_an_answer_is_exact_only_if_the_greedy_output_stops_there(tokenizer):
    """`85390455` is not `8539045`: before, the token after the answer was never looked at."""
    answer = tokenizer.encode(" 8539045")
    piece = {text: tokenizer.encode(text)[-1] for text in ("5", ".", ",")}
    assert retrieval.continues(tokenizer, answer, piece["5"])
    assert not retrieval.continues(tokenizer, answer, piece["."])
    assert not retrieval.continues(tokenizer, answer, piece[","])
    assert not retrieval.continues(tokenizer, answer, tokenizer.eos_id)
    assert not retrieval.continues(tokenizer, answer, tokenizer.encode(" the")[-1])  # a new word
    names = tokenizer.encode(" ABCDE")  # variable tracking answers with names: letters glue on too
    assert retrieval.continues(tokenizer, names, tokenizer.encode("ABCDEF")[-1])


def test_a_needle_is_found_when_the_answers_first_text_token_is_right(tokenizer):
    sample = tasks.make_sample("passkey", tokenizer, 256, 0.5, random.Random(0))
    lead = next(i for i, t in enumerate(sample.answer) if tokenizer.decode([t]).strip())
    answer, wrong = sample.answer, (sample.answer[lead] + 1) % tokenizer.vocab_size
    assert retrieval.found(tokenizer, sample, answer)
    assert retrieval.found(tokenizer, sample, answer[:lead + 2] + [wrong])  # found, then the copy fails
    assert not retrieval.found(tokenizer, sample, answer[:lead] + [wrong])  # the wrong first digit
    assert lead == 1  # sentencepiece's space piece comes first: a miss there never reaches the digit
    assert not retrieval.found(tokenizer, sample, [(answer[0] + 1) % tokenizer.vocab_size])
