"""Parameter dtypes by name: the one table shared by the model builder, conversion and the CLI."""

from __future__ import annotations

NAMES = ("float32", "bfloat16", "float16")


def to_torch(name: str):
    import torch  # here, so the CLI can list the names without importing torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def name_of(dtype) -> str:
    return str(dtype).removeprefix("torch.")
