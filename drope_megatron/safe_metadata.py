"""A Megatron checkpoint's `.metadata` files, vetted before megatron-core reads them.

torch's distributed checkpoint stores its index as a pickle and reads it with `pickle.load`, so a
checkpoint from elsewhere could run code on load. Each file is unpickled here first through an
allow-list of what torch itself writes there (its metadata classes, sizes, dtypes); anything else
refuses the checkpoint.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from drope_megatron.typed_yaml import ConfigError

METADATA = ".metadata"
# torch's checkpoint modules whose classes (dataclasses and enums, never functions) a file may name.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_NAMED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _Vetted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        elif (module, name) in _NAMED:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                           torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def vet(weights: Path) -> None:
    """Every `.metadata` under a checkpoint's weights folder (its parts' too) holds metadata only."""
    for path in sorted(weights.rglob(METADATA)):
        try:
            with open(path, "rb") as f:
                _Vetted(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path} is not a plain torch checkpoint index ({exc}): it was not loaded "
                              "(a pickle there could run code); use a checkpoint from a trusted source") from None
