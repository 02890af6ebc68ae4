"""A Megatron checkpoint's `.metadata` file, vetted before megatron-core reads it.

torch's distributed checkpoint stores its index as a pickle and reads it with `pickle.load`, so a
checkpoint from elsewhere could run code on load. Each index is unpickled here first through an
exact allow-list of what torch writes there (its metadata dataclasses and enums, sizes, dtypes,
paths); anything else refuses the checkpoint. The index must also describe every tensor as a
tensor: an entry stored as bytes is read with an unrestricted `torch.load`, so bytes are allowed
only for a layer's `_extra_state` object, which no load here ever requests.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

from drope_megatron.typed_yaml import ConfigError

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint."
_OLD_SHARD = "torch.distributed._shard.sharded_tensor.metadata"  # where older torch kept two of them
_ALLOWED = {
    *((_DCP + "metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (_DCP + "filesystem", "_StorageInfo"), (_OLD_SHARD, "TensorProperties"), (_OLD_SHARD, "MEM_FORMAT_ENCODING"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # torch's own writer stores the checkpoint's path
}


class _Vetted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _ALLOWED:  # exact pairs only: a dotted name would reach any attribute
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def vet(folder: Path) -> None:
    """The `.metadata` megatron-core is about to read from `folder` holds torch's metadata only."""
    path = Path(folder) / METADATA
    try:
        stat = os.stat(path)
    except OSError:
        return  # megatron-core reports a missing index itself
    _vet(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _vet(path: str, mtime_ns: int, size: int) -> None:
    """Cached by the file's identity: a ZeRO-3 load reads a folder once per parameter."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    refuse = f"{path} is not a plain torch checkpoint index"
    try:
        with open(path, "rb") as f:
            index = _Vetted(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{refuse} ({exc}): it was not loaded (a pickle there could run code); use a checkpoint "
                          "from a trusted source") from None
    if not isinstance(index, Metadata):
        raise ConfigError(f"{refuse} (it holds a {type(index).__name__}): it was not loaded")
    smuggled = [key for key, entry in index.state_dict_metadata.items()
                if isinstance(entry, BytesStorageMetadata) and "_extra_state" not in key]
    if smuggled:
        raise ConfigError(f"{refuse} ({smuggled[0]} is stored as pickled bytes, which torch would unpickle "
                          "unrestricted): it was not loaded")
