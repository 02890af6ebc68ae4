"""Streaming safetensors I/O for Hugging Face folders: one tensor at a time in, one tensor at a time
out into size-capped shards, laid out as `save_pretrained` lays them out.

safetensors itself writes a file only from a whole dict of tensors in memory; the writer here
writes the same format (a JSON header, then the raw bytes) one tensor at a time, and the files
it writes are read back with safetensors' own reader."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from drope_megatron import atomic
from drope_megatron.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Planned = tuple[str, tuple[int, ...], torch.dtype]  # a tensor to write: name, shape, dtype
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{index} is damaged ({type(exc).__name__}: {exc}): download it again") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index} is damaged (its weight_map is not tensor name -> file): download it again")
    return weight_map


class SafetensorsReader:
    """The tensors of a Hugging Face folder, read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / SINGLE).is_file():  # before an index, as transformers looks: the weights it would load
            with self._open(SINGLE) as shard:
                weight_map = {name: SINGLE for name in shard.keys()}
        elif (folder / INDEX).is_file():
            weight_map = _weight_map(folder / INDEX)
        elif any(folder.glob("pytorch_model*.bin")):
            raise ConfigError(f"{folder} holds only pickled pytorch_model*.bin weights, which are not loaded "
                              "(unsafe): re-save it with save_pretrained(..., safe_serialization=True)")
        else:
            raise ConfigError(f"{folder} has no {SINGLE} or {INDEX}: pass a Hugging Face model folder")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ConfigError(f"shard {shard} listed in {INDEX} is missing from {folder}: download it again")
        self.weight_map = weight_map

    def _open(self, shard: str):
        try:
            return safe_open(str(self.folder / shard), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ConfigError(f"cannot read shard {self.folder / shard} ({exc}): the file is corrupt or "
                              "truncated; download it again") from None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConfigError(f"tensor {name} is missing from {self.folder}: the checkpoint does not match its "
                              "config.json")
        # Open per tensor and close at once: a shard's memory map, once touched, would otherwise
        # stay resident and count against the process until the end of the conversion.
        try:
            with self._open(self.weight_map[name]) as shard:
                return shard.get_tensor(name)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot read {name} from {self.weight_map[name]} ({exc}): the shard is corrupt; "
                              "download it again") from None

    def dtype(self) -> torch.dtype:
        name = next(iter(self.weight_map))
        return self.get(name).dtype


class ShardedWriter:
    """Writes tensors announced in advance straight into safetensors shards of at most `max_bytes`,
    then the index; shards and index as `save_pretrained` lays them out.

    `plan` names every tensor, with its shape and dtype, in the order `add` will receive them: a
    shard's header is written first and each tensor's bytes go to the file as it arrives, so no
    shard is ever whole in memory and the shard size costs no memory. Every `sync_bytes` written,
    and at the end of each shard, the file is fsynced on a background thread while writing goes
    on: the disk works all along, instead of the kernel holding the bytes back until the export's
    final sync. Use it as a context manager: leaving the block closes an open shard and waits for
    a sync still under way."""

    def __init__(self, folder: Path, plan: Iterable[Planned], max_bytes: int = 5 * 2**30, sync_bytes: int = 2**28):
        self.folder, self.sync_bytes = folder, sync_bytes
        plan = [(name, tuple(shape), dtype) for name, shape, dtype in plan]
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names) or "__metadata__" in names:
            raise ValueError("the plan names a tensor twice, or one __metadata__: each name once")
        self.shards = _pack(plan, max_bytes)
        count = len(self.shards)
        self.names = [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                   for i in range(1, count + 1)]
        self._todo = iter([(i, entry) for i, shard in enumerate(self.shards) for entry in shard])
        self._file = None
        self._left_in_shard = 0
        self._unsynced = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-sync")
        self._syncing: Future | None = None
        self._closed = False
        # A model folder is shared like any output: the mode an ordinary new file gets.
        self._mode = atomic.file_mode()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if self._file is not None:
                self._file.close()
            if exc_type is None:
                self.close()
        finally:
            self._pool.shutdown(wait=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, which must be this one."""
        shard, (planned, shape, dtype) = next(self._todo, (None, (None, None, None)))
        got = (name, tuple(tensor.shape), tensor.dtype)
        if planned is None:
            raise ValueError(f"tensor {name} comes after the last one planned")
        if got != (planned, shape, dtype):
            raise ValueError(f"tensor {got} is not the next one planned ({planned}, {shape}, {dtype})")
        if self._file is None:
            self._open(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._unsynced += data.numel() * data.element_size()
        self._left_in_shard -= 1
        if not self._left_in_shard:
            self._sync_in_background()
            self._file.close()
            self._file = None
        elif self._unsynced >= self.sync_bytes:
            self._sync_in_background()

    def close(self) -> None:
        """Check that every planned tensor came, wait for the last sync, write the index (leaving
        the `with` block without an error does this too)."""
        if self._closed:
            return
        self._closed = True
        rest = [name for _, (name, _, _) in self._todo]
        if rest:
            raise ValueError(f"{len(rest)} planned tensor(s) never written, e.g. {rest[0]}")
        self._wait()
        if len(self.shards) > 1:
            weight_map = {name: file for file, shard in zip(self.names, self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": sum(_nbytes(e) for s in self.shards for e in s)},
                     "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _open(self, shard: int) -> None:
        path = self.folder / self.names[shard]
        self._file = open(path, "wb")
        path.chmod(self._mode)
        self._file.write(_header(self.shards[shard]))
        self._left_in_shard = len(self.shards[shard])

    def _sync_in_background(self) -> None:
        self._wait()  # one sync in flight at a time
        self._file.flush()
        fd = os.dup(self._file.fileno())  # its own descriptor: the shard may be closed meanwhile
        self._syncing = self._pool.submit(_fsync_and_close, fd)
        self._unsynced = 0

    def _wait(self) -> None:
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            syncing.result()  # a failed sync raises here


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nbytes(entry: Planned) -> int:
    _, shape, dtype = entry
    return math.prod(shape) * dtype.itemsize


def _pack(plan: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors into shards of at most `max_bytes` (a larger tensor gets its own)."""
    if not plan:
        raise ValueError("no tensors to write")
    shards: list[list[Planned]] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + _nbytes(entry) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry)
    return shards


def _header(shard: list[Planned]) -> bytes:
    """A safetensors header: little-endian u64 length, then JSON naming each tensor's dtype, shape
    and byte range, space-padded so that the data starts 8-byte aligned (as safetensors writes it)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer runs on little-endian hosts only")
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in shard:
        name, shape, dtype = entry
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name} has dtype {dtype}, which this writer does not store")
        entries[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + _nbytes(entry)]}
        offset += _nbytes(entry)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
