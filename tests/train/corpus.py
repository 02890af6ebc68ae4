"""A small synthetic corpus and a sentencepiece tokenizer trained on it, built in seconds offline."""

from __future__ import annotations

import random
from pathlib import Path

TRAIN_ARGS = ["model.vocab_size=256", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.seq_length=32", "train.micro_batch_size=2",
              "train.global_batch_size=8", "train.log_interval=1", "train.lr=1e-3", "train.seed=7"]


def build(folder: Path, docs: int = 4, lines: int = 120) -> dict[str, str]:
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(150)]
    paths = []
    for k in range(docs):
        path = folder / f"doc{k}.txt"
        path.write_text("".join(" ".join(rng.choice(words) for _ in range(16)) + "\n" for _ in range(lines)))
        paths.append(str(path))
    sentencepiece.SentencePieceTrainer.train(input=paths[0], model_prefix=str(folder / "sp"), vocab_size=160,
                                             model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                             minloglevel=2)
    return {"paths": "[" + ",".join(paths) + "]", "tokenizer": str(folder / "sp.model")}


def data_args(corpus: dict[str, str]) -> list[str]:
    return [f"data.paths={corpus['paths']}", f"data.tokenizer={corpus['tokenizer']}"]
