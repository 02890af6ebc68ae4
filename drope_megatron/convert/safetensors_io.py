"""Streaming safetensors I/O for Hugging Face folders: one tensor at a time in, size-capped shards out.

Shards and the index are laid out as `save_pretrained` lays them out."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drope_megatron import atomic
from drope_megatron.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsReader:
    """The tensors of a Hugging Face folder, read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        elif (folder / SINGLE).is_file():
            with self._open(SINGLE) as shard:
                weight_map = {name: SINGLE for name in shard.keys()}
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
    """Collects tensors into safetensors shards of at most `max_bytes`, then writes the index.

    A full shard is written on a background thread while the next one fills (safetensors writes
    without holding the GIL), so reading and writing overlap and memory holds at most two shards.
    Use it as a context manager: leaving the block waits for a write still under way, so that an
    export that fails cleans up after its last write, not during it."""

    def __init__(self, folder: Path, max_bytes: int = 2**29):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._writing: Future | None = None
        # safetensors creates files private (0600); a model folder is shared like any output.
        self._mode = atomic.file_mode()  # here, not on the writer thread

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"part-{len(self.shards) + 1}.safetensors"
        self._wait()  # one shard in flight at a time: memory stays bounded
        self._writing = self._pool.submit(_write_shard, self.pending, path, self._mode)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()  # a failed write raises here

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        self._wait()
        count = len(self.shards)
        if count == 1:
            (self.folder / "part-1.safetensors").rename(self.folder / SINGLE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.folder / f"part-{i}.safetensors").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, mode: int) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(mode)
    # On disk now, while the next shard fills: the kernel would otherwise hold the bytes back
    # until the export's final fsync and write them all then.
    atomic.sync_path(path)
