"""EOS-separated documents packed into fixed blocks of the training context (the paper's recipe),
mixed in a seeded shuffle window, served as deterministic, resumable micro-batches for one
data-parallel rank.

Block b of the global stream belongs to optimizer step b // global_batch; within a step, every
micro-step takes dp * micro_batch consecutive blocks and rank r takes its micro_batch of them.
So the union of blocks of a step does not depend on the world size, and resuming at block
`position` replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from drope_megatron.config import ConfigError


def packed_blocks(epochs: Callable[[int], Iterable], block_len: int) -> Iterator[np.ndarray]:
    """Concatenate documents (epoch after epoch) and cut [block_len] token blocks, forever."""
    buffer = np.empty(0, dtype=np.int64)
    epoch, seen = 0, 0
    while True:
        produced = False
        for doc in epochs(epoch):
            seen += len(doc)
            buffer = np.concatenate([buffer, np.asarray(doc, dtype=np.int64)])
            while len(buffer) >= block_len:
                produced = True
                yield buffer[:block_len]
                buffer = buffer[block_len:]
        if not produced and epoch == 0:
            raise ConfigError(f"the dataset has {seen} tokens, fewer than one block of {block_len}: "
                              "add data or lower model.seq_length")
        epoch += 1


def shuffled(blocks: Iterator[np.ndarray], window: int, seed: int) -> Iterator[np.ndarray]:
    """`blocks` in a seeded random order within a window of `window` blocks (a shuffle buffer).

    Shuffling documents alone leaves a long document (a book: hundreds of blocks) filling many
    consecutive batches, so the loss swings between sources and a short run sees them in bursts;
    Megatron's GPTDataset shuffles samples for the same reason. The buffer keeps the stream
    endless and replayable: the same seed gives the same order."""
    if window <= 1:
        yield from blocks
        return
    rng = np.random.default_rng(seed)
    buffer = [block.copy() for block in itertools.islice(blocks, window)]  # copies: views pin whole documents
    for block in blocks:
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = block.copy()


class BatchStream:
    """This rank's micro-batches ([micro_batch, seq_length + 1] token blocks), from global block `position`."""

    def __init__(self, blocks: Iterator[np.ndarray], micro_batch: int, dp_rank: int, dp_size: int,
                 position: int = 0):
        self.blocks, self.micro, self.rank, self.dp = blocks, micro_batch, dp_rank, dp_size
        self.position = 0
        for _ in range(position):  # replay the stream to where the checkpoint left it
            next(self.blocks)
            self.position += 1

    def next_micro_batch(self) -> torch.Tensor:
        group = [next(self.blocks) for _ in range(self.micro * self.dp)]
        self.position += len(group)
        mine = group[self.rank * self.micro:(self.rank + 1) * self.micro]
        return torch.from_numpy(np.stack(mine))
