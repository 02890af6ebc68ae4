"""Write Megatron indexed datasets (.bin/.idx): documents tokenised once, read back by megatron-core.

The writer is megatron-core's own `IndexedDatasetBuilder`; this module only feeds it token-id
documents (each ending with EOS, as `documents()` yields them) and publishes both files atomically.
Training reads the result with `data.format=megatron data.paths=[PREFIX]`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from drope_megatron import atomic
from drope_megatron.config import ConfigError


def write_indexed(docs: Iterable, prefix: str | Path, vocab_size: int) -> dict:
    """Write `prefix`.bin/.idx from token-id documents; returns counts (also in `prefix`.json)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = iter(docs)
    first = next(docs, None)  # bad input fails here, before anything is created
    if first is None:
        raise ConfigError("no documents to write: the input is empty")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    tmp = prefix.with_name(f".{prefix.name}.{os.getpid()}.partial")  # two writers never share one
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    count = tokens = 0
    try:
        for doc in itertools.chain([first], docs):
            ids = torch.as_tensor(np.asarray(doc, dtype=np.int64))
            outside = ids[(ids < 0) | (ids >= vocab_size)]  # uint16 storage would wrap them
            if len(outside):
                raise ConfigError(f"document {count} has token id {int(outside[0])} outside the vocabulary of "
                                  f"{vocab_size}: the tokenizer's ids exceed its size; check the tokenizer")
            builder.add_document(ids, [len(ids)])
            count += 1
            tokens += len(ids)
        builder.finalize(f"{tmp}.idx")
        # An old .idx (and its counts) go first and the new one comes last: a reader finds an index
        # only beside the whole data it describes, never an old index beside new data.
        Path(f"{prefix}.idx").unlink(missing_ok=True)
        Path(f"{prefix}.json").unlink(missing_ok=True)
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    finally:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    info = {"documents": count, "tokens": tokens, "dtype": np.dtype(dtype).name}
    atomic.write_json(f"{prefix}.json", info)
    return info
