"""Make the next item of a stream in a background thread while the caller handles this one.

A conversion alternates reading (safetensors or dist-checkpoint reads, dtype casts, QKV
concatenation) and writing; torch, safetensors and file I/O release the GIL, so with one item
made ahead the two overlap instead of adding up. Memory holds one item more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


@contextlib.contextmanager
def read_ahead(items: Iterable[T]) -> Iterator[Iterator[T]]:
    """`with read_ahead(items) as stream:` gives `items` in order, each made while the previous
    one is used; an error raised making an item is raised where it would have been yielded.
    Leaving the block, even on an error, waits for the item under way and closes `items`, so no
    read outlives the block (the reads may use a process group that the caller tears down next)."""
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")

    def stream() -> Iterator[T]:
        pending = pool.submit(next, source, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, source, _END)
            yield item

    try:
        yield stream()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if hasattr(source, "close"):
            source.close()
