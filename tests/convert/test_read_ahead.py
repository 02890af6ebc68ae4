"""read_ahead: the next item is made while the caller holds this one; order and errors are kept,
and nothing is still being read once the block is left."""

from __future__ import annotations

import threading

import pytest

from drope_megatron.convert.read_ahead import read_ahead


def test_the_next_item_is_made_while_this_one_is_used():
    started = {i: threading.Event() for i in range(3)}

    def items():
        for i in range(3):
            started[i].set()
            yield i

    out = []
    with read_ahead(items()) as stream:
        for item in stream:
            if item < 2:  # the producer reaches item+1 without the consumer asking for it
                assert started[item + 1].wait(timeout=10)
            out.append(item)
    assert out == [0, 1, 2]


def test_an_error_surfaces_where_its_item_would_have():
    def items():
        yield "a"
        yield "b"
        raise ValueError("bad tensor")

    got = []
    with pytest.raises(ValueError, match="bad tensor"), read_ahead(items()) as stream:
        for item in stream:
            got.append(item)
    assert got == ["a", "b"]


def test_a_consumer_that_fails_leaves_no_read_running_and_closes_the_source():
    started, release, closed, reading = threading.Event(), threading.Event(), threading.Event(), []

    def items():
        try:
            yield 0
            started.set()
            release.wait(timeout=10)
            reading.append("done")
            yield 1
        finally:
            closed.set()

    with pytest.raises(RuntimeError, match="write failed"), read_ahead(items()) as stream:
        next(stream)
        assert started.wait(timeout=10)  # the read of item 1 is under way when the consumer fails
        threading.Timer(0.2, release.set).start()
        raise RuntimeError("write failed")
    assert reading == ["done"] and closed.is_set()  # waited for that read, then closed the source
