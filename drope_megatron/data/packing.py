"""EOS-separated documents packed into fixed blocks of the training context (the paper's recipe),
mixed in a seeded shuffle window, served as deterministic, resumable micro-batches for one
data-parallel rank.

Block b of the global stream belongs to optimizer step b // global_batch; within a step, every
micro-step takes dp * micro_batch consecutive blocks and rank r takes its micro_batch of them.
So the union of blocks of a step does not depend on the world size. The stream's `state()` (where
the packer stands in the documents, the shuffle window and its RNG) goes into every checkpoint,
and a stream built from it continues exactly there without reading the documents before it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from drope_megatron.config import ConfigError


class PackedBlocks:
    """Documents concatenated epoch after epoch and cut into [block_len] token blocks, forever.
    `epochs(epoch, start)` yields an epoch's documents from its `start`-th on."""

    def __init__(self, epochs: Callable[[int, int], Iterable], block_len: int, state: dict | None = None):
        self.epochs, self.block_len = epochs, block_len
        state = state or {"epoch": 0, "doc": 0, "carry": []}
        self.epoch, self.doc = state["epoch"], state["doc"]
        self.carry = np.asarray(state["carry"], dtype=np.int64)  # tokens read but not yet in a block

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "doc": self.doc, "carry": self.carry.astype(np.int32)}

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            whole_epoch, produced = self.doc == 0, False
            for doc in self.epochs(self.epoch, self.doc):
                self.carry = np.concatenate([self.carry, np.asarray(doc, dtype=np.int64)])
                self.doc += 1
                while len(self.carry) >= self.block_len:
                    block, self.carry = self.carry[:self.block_len], self.carry[self.block_len:]
                    produced = True
                    yield block
            # Any epoch: data changed under a resumed run could otherwise leave this loop waiting forever.
            if whole_epoch and not produced:
                raise ConfigError(f"the dataset has {len(self.carry)} tokens, fewer than one block of "
                                  f"{self.block_len}: add data or lower model.seq_length")
            self.epoch, self.doc = self.epoch + 1, 0


class ShuffledBlocks:
    """Blocks in a seeded random order within a window of `window` blocks (a shuffle buffer).

    Shuffling documents alone leaves a long document (a book: hundreds of blocks) filling many
    consecutive batches, so the loss swings between sources and a short run sees them in bursts;
    Megatron's GPTDataset shuffles samples for the same reason."""

    def __init__(self, blocks: PackedBlocks, window: int, seed: int, state: dict | None = None,
                 made_from: dict[str, Any] | None = None):
        self.blocks, self.window = blocks, max(window, 1)
        self.made_from = made_from or {}
        self.rng = np.random.default_rng(seed)
        self.buffer: list[np.ndarray] = []
        if state is not None:
            saved = state.get("size", len(state["window"]) or 1)
            if saved != self.window:  # the saved window's blocks would be lost, or their order change
                raise ConfigError(f"the checkpoint's data stream has data.shuffle_window={saved}, this run "
                                  f"{self.window}: resume with data.shuffle_window={saved}")
            _same_making(state.get("made_from", {}), self.made_from)
            self.rng.bit_generator.state = state["rng"]
            self.buffer = [row.astype(np.int64) for row in state["window"]]

    def state(self) -> dict[str, Any]:
        window = np.stack(self.buffer).astype(np.int32) if self.buffer else np.empty((0, 0), np.int32)
        return {"packed": self.blocks.state(), "rng": self.rng.bit_generator.state, "window": window,
                "size": self.window, "made_from": self.made_from}

    def __iter__(self) -> Iterator[np.ndarray]:
        source = iter(self.blocks)
        if self.window == 1:
            yield from source
            return
        while len(self.buffer) < self.window:
            self.buffer.append(next(source).copy())  # copies: views pin whole documents
        for block in source:
            i = int(self.rng.integers(len(self.buffer)))
            out, self.buffer[i] = self.buffer[i], block.copy()
            yield out


def _same_making(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """A saved stream continues only under the settings that made it: another block length would
    mix blocks of two sizes, another seed or format another order of other documents."""
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise ConfigError(f"the checkpoint's data stream was made with {key}={saved[key]}, this run has "
                              f"{value}: resume with {key}={saved[key]} or start a new run directory")


def block_stream(epochs: Callable[[int, int], Iterable], block_len: int, window: int, seed: int,
                 state: dict | None = None, made_from: dict[str, Any] | None = None) -> ShuffledBlocks:
    """The global block stream (`window` 0 or 1: documents' own order), from a saved `state`.
    `made_from` names the settings (recipe keys and values) the stream depends on: a state saved
    under others is refused."""
    packed = PackedBlocks(epochs, block_len, state["packed"] if state else None)
    return ShuffledBlocks(packed, window, seed, state, made_from)


class BatchStream:
    """This rank's micro-batches ([micro_batch, seq_length + 1] token blocks), from global block `position`.

    `blocks` built from a checkpoint's `state()` already stands at `position`; without a state (an
    older checkpoint) the stream is replayed from the start to `position`."""

    def __init__(self, blocks: ShuffledBlocks, micro_batch: int, dp_rank: int, dp_size: int,
                 position: int = 0, replay: bool = False):
        self.source, self.micro, self.rank, self.dp = blocks, micro_batch, dp_rank, dp_size
        self.blocks = iter(blocks)
        self.position = position
        for _ in range(position if replay else 0):
            next(self.blocks)

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def next_micro_batch(self) -> torch.Tensor:
        group = [next(self.blocks) for _ in range(self.micro * self.dp)]
        self.position += len(group)
        mine = group[self.rank * self.micro:(self.rank + 1) * self.micro]
        return torch.from_numpy(np.stack(mine))
