"""Retrieval scoring by exact match of the greedy answer.

Greedy decoding reproduces the answer's tokens exactly when, fed the prompt and the answer, the
model's argmax at every answer position is the answer's next token: generation and teacher
forcing agree up to the first mistake. The greedy answer is the answer only if it then stops:
the token after it must not extend its last word (`85390455` for `8539045` is wrong). So one
forward pass scores a sample exactly, instead of one pass per generated token (a test checks the
two agree).

Exact match is the score. Beside it, `found` counts answers whose first text-bearing token is
right: at small scale a model can find the needle by its content yet fail to copy the rest, and
the two failures have different causes.
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from drope_megatron.distributed import data_parallel_gather, data_parallel_share
from drope_megatron.eval.tasks import Sample, make_sample


def score(backend, sample: Sample) -> tuple[bool, list[int]]:
    """(greedy output is the answer and ends there, the greedy tokens up to and including the
    first miss, or the answer and the token after it)."""
    ids = torch.tensor([sample.prompt + sample.answer], dtype=torch.long)
    predicted = backend.logits(ids, keep=len(sample.answer) + 1)[0].argmax(-1).tolist()
    for i, (p, a) in enumerate(zip(predicted, sample.answer)):
        if p != a:
            return False, predicted[:i + 1]
    return not continues(backend.tokenizer, sample.answer, predicted[-1]), predicted


def continues(tokenizer, answer: list[int], following: int) -> bool:
    """`following` extends the answer's last word: its text starts with a letter or digit, glued on
    (a space, punctuation, a newline or the EOS end the answer)."""
    if following == tokenizer.eos_id:
        return False
    before, after = tokenizer.decode(answer), tokenizer.decode([*answer, following])
    added = after[len(before):] if after.startswith(before) else after
    return bool(added) and added[0].isalnum()


def samples(task: str, tokenizer, length: int, depths: list[float], per_depth: int, seed: int) -> list[Sample]:
    """The same prompts for every model and method: seeded by task, length and depth only."""
    out = []
    for depth in depths:
        rng = random.Random(f"{seed}/{task}/{length}/{depth}")
        out += [make_sample(task, tokenizer, length, depth, rng) for _ in range(per_depth)]
    return out


def found(tokenizer, sample: Sample, predicted: list[int]) -> bool:
    """The greedy answer is right up to its first token that carries text (the first digit of a
    passkey, after the space piece): the model found the needle, whether or not it then copies
    the rest of it."""
    lead = next((i for i, t in enumerate(sample.answer) if tokenizer.decode([t]).strip()), 0)
    return len(predicted) > lead and predicted[lead] == sample.answer[lead]


def evaluate(backend, task_samples: list[Sample], progress: bool = False, label: str = "") -> dict:
    """Exact-match accuracy overall and per depth, the share of needles found, the longest prompt
    (answer included) in tokens, and the first sample's prediction for the report. Data-parallel
    ranks score a share of the samples each."""
    mine = data_parallel_share(list(enumerate(task_samples)), backend.whole_model)
    scored = []  # (index, depth, exact, found, the prediction's text)
    for i, sample in tqdm(mine, desc=f"{label} {task_samples[0].task} {task_samples[0].length}",
                          disable=not progress, leave=False):
        ok, predicted = score(backend, sample)
        scored.append((i, sample.depth, ok, found(backend.tokenizer, sample, predicted),
                       backend.tokenizer.decode(predicted).strip()))
    scored = sorted(row for share in data_parallel_gather(scored, backend.whole_model) for row in share)
    by_depth: dict[float, list[bool]] = {}
    for _, depth, ok, _, _ in scored:
        by_depth.setdefault(depth, []).append(ok)
    hits_found = [row[3] for row in scored]
    example = {"answer": task_samples[0].answer_text, "predicted": scored[0][4]}
    hits = [h for hs in by_depth.values() for h in hs]
    return {"accuracy": sum(hits) / len(hits), "found": sum(hits_found) / len(hits), "samples": len(hits),
            "prompt_tokens": max(len(s.prompt) + len(s.answer) for s in task_samples),  # with the answer
            "by_depth": {f"{d:g}": sum(hs) / len(hs) for d, hs in sorted(by_depth.items())}, "example": example}
