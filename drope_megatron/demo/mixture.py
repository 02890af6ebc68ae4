"""The demo's training data: real prose from the offline corpus plus synthetic retrieval documents.

A tiny model trained for minutes on prose never learns to retrieve, so a share of training
documents are retrieval prompts with their answers (passkey and single-needle, the evaluation's
formats with training seeds), each shorter than the training context: length generalisation is
then tested past that context only. Both parts are written once as Megatron indexed datasets,
which `data.format=megatron` reads on any machine without re-tokenising.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from drope_megatron import atomic
from drope_megatron.config import DataConfig
from drope_megatron.data.documents import documents
from drope_megatron.data.indexed import write_indexed
from drope_megatron.data.tokenizer import Tokenizer, load_tokenizer
from drope_megatron.eval.tasks import make_sample

TRAIN_TASKS = ("passkey", "niah_single")


def retrieval_documents(tok: Tokenizer, count: int, seq_length: int, seed: int,
                        progress: bool = False) -> Iterator[list[int]]:
    """`count` prompts + answers + EOS, lengths uniform in [seq_length / 2, seq_length], any depth."""
    rng = random.Random(f"train/{seed}")  # evaluation seeds prompts by task/length/depth: no overlap
    for i in tqdm(range(count), desc="retrieval documents", disable=not progress, leave=False):
        sample = make_sample(TRAIN_TASKS[i % len(TRAIN_TASKS)], tok, rng.randint(seq_length // 2, seq_length),
                             rng.random(), rng)
        yield sample.prompt + sample.answer + [tok.eos_id]


def _settings(corpus: Path, tokenizer: Path, seq_length: int, retrieval_share: float, seed: int) -> dict:
    return {"corpus": json.loads((corpus / "corpus.json").read_text()),
            "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest(), "seq_length": seq_length,
            "retrieval_share": retrieval_share, "seed": seed, "version": 1}


def is_built(corpus: Path, tokenizer: Path, out: Path, seq_length: int, retrieval_share: float, seed: int = 0) -> bool:
    manifest = out / "mixture.json"
    return manifest.is_file() and corpus.joinpath("corpus.json").is_file() and json.loads(
        manifest.read_text()).get("settings") == _settings(corpus, tokenizer, seq_length, retrieval_share, seed)


def build(corpus: Path, tokenizer: Path, out: Path, seq_length: int, retrieval_share: float, seed: int = 0,
          progress: bool = False) -> dict[str, str]:
    """Indexed prose and retrieval datasets in `out`, tokenised with the model's `tokenizer`
    (reused when built with the same settings); returns their prefixes. `retrieval_share` is the
    retrieval fraction of all training tokens."""
    settings = _settings(corpus, tokenizer, seq_length, retrieval_share, seed)
    manifest = out / "mixture.json"
    prefixes = {"prose": str(out / "prose"), "retrieval": str(out / "retrieval")}
    if is_built(corpus, tokenizer, out, seq_length, retrieval_share, seed):
        return prefixes
    # The manifest goes first and comes back last: a rebuild stopped halfway, with some files of the
    # new settings beside others of the old, is never taken for a finished build of either.
    manifest.unlink(missing_ok=True)
    tok = load_tokenizer(tokenizer)
    prose = DataConfig(paths=[str(corpus / "train.jsonl")], format="json", shuffle=False)
    counts = {"prose": write_indexed(documents(prose, tok, 0, seed), prefixes["prose"], tok.vocab_size)}
    mean_length = 0.75 * seq_length + 1
    wanted = counts["prose"]["tokens"] * retrieval_share / (1 - retrieval_share)
    docs = retrieval_documents(tok, max(1, round(wanted / mean_length)), seq_length, seed, progress)
    counts["retrieval"] = write_indexed(docs, prefixes["retrieval"], tok.vocab_size)
    atomic.write_json(manifest, {"settings": settings, "counts": counts})
    return prefixes
