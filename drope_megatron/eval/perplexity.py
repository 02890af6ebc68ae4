"""Perplexity by length on held-out long documents, with per-position loss curves.

Every document is read from its start and must hold at least the longest length tested, so each
length sees the same documents and no document is cut into unrelated pieces. The per-position
curve (mean loss in position bins) shows where a model breaks past its training length. In a job
with data-parallel ranks (more processes than TP), each rank reads its share of the documents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from drope_megatron.config import ConfigError, DataConfig
from drope_megatron.distributed import data_parallel_share, data_parallel_sum
from drope_megatron.data.documents import documents, file_format
from drope_megatron.data.tokenizer import Tokenizer

def long_documents(paths: list[str], tokenizer: Tokenizer, min_tokens: int, limit: int,
                   text_key: str = "text", vocab_size: int | None = None) -> list[list[int]]:
    """The first `limit` documents (in file order) of at least `min_tokens` tokens, cut to that length.
    Already tokenised (Megatron) documents are checked against the model's `vocab_size`."""
    d = DataConfig(paths=list(paths), format=file_format(paths), text_key=text_key, shuffle=False)
    found, longest = [], 0
    for doc in documents(d, tokenizer, epoch=0, seed=0, vocab_size=vocab_size):
        longest = max(longest, len(doc))
        if len(doc) >= min_tokens:
            found.append(list(doc[:min_tokens]))
            if len(found) == limit:
                break
    if not found:
        raise ConfigError(f"no document in {', '.join(paths)} has {min_tokens} tokens (the longest has {longest}): "
                          "pass longer documents or test shorter lengths")
    return found


def token_losses(backend, tokens: list[int], chunk: int = 4096) -> torch.Tensor:
    """Next-token loss at positions 1..len-1 (nats), in fp32. The loss is taken `chunk` positions
    at a time: an fp32 copy of all logits (plus cross-entropy's own) is several times the model's
    logits, which at 32k tokens x a 128k vocabulary are already 8 GB in bf16."""
    ids = torch.tensor([tokens], dtype=torch.long)
    logits = backend.logits(ids)[0, :-1]
    targets = ids[0, 1:].to(logits.device)
    return torch.cat([F.cross_entropy(logits[i:i + chunk].float(), targets[i:i + chunk], reduction="none").cpu()
                      for i in range(0, len(targets), chunk)])


def perplexity(backend, docs: list[list[int]], length: int, bins: int = 32, progress: bool = False,
               label: str = "") -> dict:
    """Perplexity over the first `length` tokens of each document, and mean loss per position bin."""
    total = torch.zeros(length - 1, dtype=torch.float64)
    mine = data_parallel_share(docs, backend.whole_model)
    for doc in tqdm(mine, desc=f"ppl {label} {length}", disable=not progress, leave=False):
        total += token_losses(backend, doc[:length]).double()
    per_position = data_parallel_sum(total, backend.whole_model) / len(docs)
    width = max(1, math.ceil((length - 1) / bins))
    curve = [per_position[i:i + width].mean().item() for i in range(0, length - 1, width)]
    mean = per_position.mean().item()
    return {"ppl": math.exp(mean), "loss": mean, "documents": len(docs), "tokens": len(docs) * (length - 1),
            "bin_width": width, "position_loss": curve}
