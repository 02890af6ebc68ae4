"""Retrieval prompts generated offline: passkey (Landmark/PI format) and RULER-style needle tasks.

A prompt is an instruction, a haystack of filler sentences with needles inserted between them, and
a question whose greedy continuation is the answer. The haystack is fitted to the tokenizer so
that prompt + answer is as close to the target length as whole filler sentences allow; the
queried needle sits at the requested depth (0 = start of the haystack, 1 = end).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from drope_megatron.config import ConfigError
from drope_megatron.data.tokenizer import Tokenizer

PASSKEY = "passkey"
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
TASKS = (PASSKEY, *NIAH)
# The haystack cycles through these sentences; one sentence is the unit of fitting (a few tokens).
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
WORDS = ("apple", "river", "candle", "garden", "mirror", "silver", "forest", "pepper", "rocket", "violin",
         "harbor", "lantern", "meadow", "pencil", "saddle", "tunnel", "walnut", "anchor", "basket", "castle",
         "dragon", "falcon", "glacier", "hammer", "island", "jacket", "kettle", "ladder", "marble", "needle",
         "orchard", "parrot", "quartz", "ribbon", "shadow", "thunder", "velvet", "window", "yellow", "zipper",
         "bridge", "copper", "desert", "engine", "feather", "ginger", "helmet", "insect", "jungle", "kitten")
NEEDLES = 4  # keys, values or queries in the multi-needle tasks (RULER's defaults)
VT_HOPS = 5


@dataclass
class Sample:
    """One prompt: token ids, the answer's token ids, and where its needles were put."""

    task: str
    length: int  # target tokens for prompt + answer
    depth: float
    prompt: list[int]
    answer: list[int]
    answer_text: str
    needles: list[str] = field(default_factory=list)


@dataclass
class _Spec:
    intro: str
    needles: list[str]  # needles[0] is the queried one, placed at the depth
    question: str
    answer: str
    in_order: bool = False  # needles keep their order (variable chains) after the first


def make_sample(task: str, tokenizer: Tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    """A prompt of `task` whose prompt + answer fit `length` tokens, queried needle at `depth`."""
    if task not in TASKS:
        raise ConfigError(f"unknown retrieval task {task!r}: use one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"needle depth {depth} must be within 0..1")
    spec = _SPECS[task](rng)
    layout = rng.random()  # the other needles' slots: the same while fitting and in the prompt
    sentences = _fit(spec, tokenizer, length, depth, layout)
    prompt_text = _render(spec, sentences, depth, random.Random(layout))
    prompt = [*tokenizer.bos, *tokenizer.encode(prompt_text)]
    full = [*tokenizer.bos, *tokenizer.encode(prompt_text + spec.answer)]
    if full[:len(prompt)] != prompt:
        raise ConfigError(f"the tokenizer merges the {task} answer into the question; cannot score exact match")
    return Sample(task, length, depth, prompt, full[len(prompt):], spec.answer.strip(), spec.needles)


def _fit(spec: _Spec, tokenizer: Tokenizer, length: int, depth: float, layout: float) -> int:
    """The most filler sentences for which prompt + answer stay within `length` tokens."""
    def size(n: int) -> int:
        text = _render(spec, n, depth, random.Random(layout)) + spec.answer
        return len(tokenizer.bos) + len(tokenizer.encode(text))

    base = size(0)
    if base > length:
        raise ConfigError(f"{length} tokens cannot hold the task's instruction, needles and question ({base} tokens)")
    per = max(1, size(20) - base) / 20
    n = max(0, int((length - base) / per))
    while n > 0 and size(n) > length:
        n -= 1
    while size(n + 1) <= length:
        n += 1
    return n


def _render(spec: _Spec, n_filler: int, depth: float, rng: random.Random) -> str:
    # Needles go before filler sentence `slot` (slot n_filler: after the last). The queried needle
    # takes slot round(depth * n); the others seeded slots (after it, in order, for variable chains).
    first = round(depth * n_filler)
    others = [rng.randint(first if spec.in_order else 0, n_filler) for _ in spec.needles[1:]]
    slots = [first, *(sorted(others) if spec.in_order else others)]
    before: dict[int, list[str]] = {}
    for slot, needle in sorted(zip(slots, spec.needles), key=lambda pair: pair[0]):
        before.setdefault(slot, []).append(needle)
    body = []
    for i in range(n_filler + 1):
        body += before.get(i, []) + ([FILLER[i % len(FILLER)]] if i < n_filler else [])
    return f"{spec.intro}\n{' '.join(body)}\n{spec.question}"


def _passkey(rng: random.Random) -> _Spec:
    key = str(rng.randint(10000, 99999))
    return _Spec(PASSKEY_INTRO, [f"The pass key is {key}. Remember it. {key} is the pass key."],
                 "What is the pass key? The pass key is", f" {key}")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _single(rng: random.Random, keys: int = 1) -> _Spec:
    names = rng.sample(WORDS, keys)
    values = [_number(rng) for _ in names]
    q = names[0]
    return _Spec(NIAH_INTRO, [_needle(k, v) for k, v in zip(names, values)],
                 f"What is the special magic number for {q} mentioned in the provided text? "
                 f"The special magic number for {q} mentioned in the provided text is", f" {values[0]}")


def _multivalue(rng: random.Random) -> _Spec:
    key = rng.choice(WORDS)
    values = [_number(rng) for _ in range(NEEDLES)]
    return _Spec(NIAH_INTRO, [_needle(key, v) for v in values],
                 f"What are all the special magic numbers for {key} mentioned in the provided text, in order? "
                 f"The special magic numbers for {key} mentioned in the provided text are",
                 " " + ", ".join(values), in_order=True)


def _multiquery(rng: random.Random) -> _Spec:
    names = rng.sample(WORDS, NEEDLES)
    values = [_number(rng) for _ in names]
    asked = ", ".join(names[:-1]) + f" and {names[-1]}"
    return _Spec(NIAH_INTRO, [_needle(k, v) for k, v in zip(names, values)],
                 f"What are all the special magic numbers for {asked} mentioned in the provided text? "
                 f"The special magic numbers for {asked} mentioned in the provided text are",
                 " " + ", ".join(values))


def _variable_tracking(rng: random.Random) -> _Spec:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(VT_HOPS)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return _Spec(VT_INTRO, chain,
                 f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                 f"According to the chain(s) of variable assignment in the text above, {VT_HOPS} variables are "
                 f"assigned the value {value}, they are:", " " + " ".join(names), in_order=True)


_SPECS = {PASSKEY: _passkey, "niah_single": _single, "niah_multikey": lambda rng: _single(rng, NEEDLES),
          "niah_multivalue": _multivalue, "niah_multiquery": _multiquery, "vt": _variable_tracking}
