"""Packing documents into blocks, the shuffle window, the stream's saved state, and the per-rank
batch stream."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from drope_megatron.config import ConfigError
from drope_megatron.data.packing import BatchStream, PackedBlocks, block_stream


def _book_and_notes(epoch, start=0):
    """One long document (40 blocks of 4, tokens < 160) between one-block notes; every token
    unique within an epoch."""
    notes = [list(range(160 + 4 * k, 164 + 4 * k)) for k in range(200)]
    return [*notes[:100], list(range(160)), *notes[100:]][start:]


def _first(stream, n):
    return [b.tolist() for b in itertools.islice(iter(stream), n)]


def test_documents_are_concatenated_and_cut_into_blocks_epoch_after_epoch():
    blocks = PackedBlocks(lambda epoch, start: [[epoch, 7], [epoch, 8, 9]][start:], 3)
    assert _first(blocks, 4) == [[0, 7, 0], [8, 9, 1], [7, 1, 8], [9, 2, 7]]
    with pytest.raises(ConfigError, match="fewer than one block"):
        next(iter(PackedBlocks(lambda epoch, start: [[1, 2]][start:], 3)))
    # Resumed in epoch 2 onto data that shrank below one block: an error, not an endless loop.
    with pytest.raises(ConfigError, match="fewer than one block"):
        next(iter(PackedBlocks(lambda epoch, start: [[1]][start:], 3, {"epoch": 2, "doc": 5, "carry": []})))


def test_shuffle_window_spreads_a_long_document_and_replays_by_seed():
    def first(window, seed, n=240):
        return _first(block_stream(_book_and_notes, 4, window, seed), n)

    def longest_run(blocks):
        return max(len(list(run)) for in_book, run in itertools.groupby(b[0] < 160 for b in blocks) if in_book)

    assert longest_run(first(0, 0)) == 40  # in the documents' order: the book fills 40 blocks in a row
    assert longest_run(first(64, 0)) <= 4
    assert first(64, 0) == first(64, 0) and first(64, 0) != first(64, 1)
    # nothing is lost or made up: a window reorders the same blocks
    served = [tuple(b) for b in first(64, 0, 150)]
    assert len(set(served)) == 150
    assert set(served) <= {tuple(b) for b in _first(PackedBlocks(_book_and_notes, 4), 150 + 63)}


def test_shuffled_blocks_are_copies_not_views_of_whole_documents():
    blocks = iter(block_stream(_book_and_notes, 4, 8, 0))
    assert all(next(blocks).base is None for _ in range(20))


@pytest.mark.parametrize("window", [0, 16])
def test_a_stream_built_from_a_saved_state_continues_without_reading_earlier_documents(window):
    reads = []

    def epochs(epoch, start):
        reads.append((epoch, start))
        return _book_and_notes(epoch, start)

    stream = block_stream(epochs, 5, window, seed=3)
    blocks = iter(stream)
    for _ in range(230):  # into the second epoch, mid-document
        next(blocks)
    state = stream.state()
    expected = [next(blocks).tolist() for _ in range(300)]
    reads.clear()
    again = block_stream(epochs, 5, window, seed=3, state=state)
    assert _first(again, 300) == expected
    assert reads[0] == (state["packed"]["epoch"], state["packed"]["doc"]) and reads[0][1] > 0


def test_a_resumed_stream_replays_what_an_uninterrupted_one_serves():
    def stream(position=0, state=None, rank=0, replay=False):
        return BatchStream(block_stream(_book_and_notes, 5, 16, 3, state), micro_batch=2, dp_rank=rank,
                           dp_size=2, position=position, replay=replay)

    whole = stream()
    batches = [whole.next_micro_batch() for _ in range(4)]
    state, position = whole.state(), whole.position
    batches += [whole.next_micro_batch() for _ in range(2)]
    for resumed in (stream(position, state), stream(position, replay=True)):  # from a state, or replayed
        assert all((resumed.next_micro_batch() == b).all() for b in batches[-2:])
        assert resumed.position == whole.position
    # Together the ranks serve what one rank of a data-parallel size 1 serves, each block once:
    # rank 0 the first half of each group of 2 x 2 blocks, rank 1 the second.
    other = stream(rank=1)
    alone = BatchStream(block_stream(_book_and_notes, 5, 16, 3), micro_batch=4, dp_rank=0, dp_size=1)
    for step in range(3):
        both = torch.cat([batches[step], other.next_micro_batch()])
        assert torch.equal(both, alone.next_micro_batch())
        assert len({tuple(row) for row in both.tolist()}) == 4


def test_a_changed_shuffle_window_is_refused_on_resume():
    stream = block_stream(_book_and_notes, 5, 16, seed=3)
    _first(stream, 40)
    for window in (0, 8):  # the saved window's 16 blocks would be dropped, or served in another order
        with pytest.raises(ConfigError, match="resume with data.shuffle_window=16"):
            block_stream(_book_and_notes, 5, window, seed=3, state=stream.state())


def test_a_stream_resumes_only_under_the_settings_that_made_it():
    made = {"model.seq_length": 4, "train.seed": 3}
    stream = block_stream(_book_and_notes, 5, 16, seed=3, made_from=made)
    _first(stream, 40)
    state = stream.state()
    for key, value in (("model.seq_length", 8), ("train.seed", 4)):
        with pytest.raises(ConfigError, match=f"made with {key}={made[key]}, this run has {value}: resume with "
                                              f"{key}={made[key]}"):
            block_stream(_book_and_notes, 5, 16, seed=3, state=state, made_from={**made, key: value})
    block_stream(_book_and_notes, 5, 16, seed=3, state=state, made_from=made)  # the same: resumes
    older = {k: v for k, v in state.items() if k != "made_from"}  # a checkpoint from before the check
    block_stream(_book_and_notes, 5, 16, seed=3, state=older, made_from={**made, "train.seed": 4})
