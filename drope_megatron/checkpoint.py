"""The project's Megatron checkpoint: a megatron-core dist checkpoint plus a small metadata file.

    CKPT/
      drope_checkpoint.json   model config (ModelConfig), padded vocab, source architecture, dtype
      weights/                megatron-core `dist_checkpointing` (torch_dist): loads at any TP/PP
      tokenizer/              the model's tokenizer files, when it has them

Writes go to a temporary sibling folder renamed into place at the end, so a reader never sees
half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from drope_megatron import atomic
from drope_megatron.config import (ConfigError, ModelConfig, ParallelConfig, Recipe, model_config_from_dict,
                                   validate)

META = "drope_checkpoint.json"
FORMAT = "drope-megatron/1"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise ConfigError(f"{path} is not a drope Megatron checkpoint (no {META}): convert one with "
                          "`drope convert hf-to-megatron`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{meta_path} is not valid JSON: the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT}")
    return meta


def model_config(path: str | Path) -> ModelConfig:
    return model_config_from_dict(read_meta(path)["model"])


def save(model, m: ModelConfig, dst: str | Path, extra: dict[str, Any] | None = None,
         tokenizer: Path | None = None, sharded: dict | None = None) -> Path:
    """Collective over all ranks: write the model's shards, metadata and tokenizer, then publish.

    `extra` adds top-level metadata (e.g. `source`, the Hugging Face origin, kept across saves);
    `tokenizer` (a tokenizer folder or a sentencepiece .model file) is copied into `tokenizer/`;
    `sharded` replaces `model.sharded_state_dict()` (ZeRO-3 saves its own pieces)."""
    from megatron.core import dist_checkpointing  # here, so metadata readers import nothing heavy

    dst = Path(dst)
    tmp = atomic.staging_dir(dst)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    _barrier()
    try:
        dist_checkpointing.save(sharded if sharded is not None else model.sharded_state_dict(), str(tmp / "weights"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank0:
        meta = {"format": FORMAT, "model": dataclasses.asdict(m), **(extra or {})}
        # The live model is the truth for what it computes: its padding and its current phase.
        meta["model"].update(padded_vocab_size=model.vocab_size, phase=model.phase,
                             rope_layers=model.rope_layers if model.phase == "layers" else m.rope_layers)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        _copy_tokenizer(tokenizer, tmp / "tokenizer")
        atomic.publish_dir(tmp, dst)
    _barrier()
    return dst


NEW_NORMS = ("q_layernorm.weight", "k_layernorm.weight")  # the QK-norm variant's weights, absent from a plain checkpoint


def prepare(path: str | Path, p: ParallelConfig, dtype: str | None = None, add_qk_norm: bool = False,
            attention_backend: str | None = None) -> tuple[ModelConfig, bool, Path]:
    """The model config to build for loading `path` at this TP/PP, whether q/k norms are new, the weights folder."""
    m = model_config(path)
    if dtype is not None:
        m.params_dtype = dtype
    if attention_backend is not None:
        m.attention_backend = attention_backend
    new_norms = add_qk_norm and not m.qk_norm
    if new_norms:
        if m.qk_head_norm:
            raise ConfigError("the checkpoint has per-head q/k norms (Qwen3); the full-width QK-norm variant "
                              "replaces them and cannot start from it")
        m.qk_norm = True
    validate(Recipe(model=m, parallel=p))
    weights = Path(path) / "weights"
    if not (weights / "metadata.json").is_file():
        raise ConfigError(f"{weights} is missing or incomplete: the checkpoint is damaged")
    return m, new_norms, weights


def load_sharded(request: dict, weights: Path, whole: bool = True) -> dict:
    """megatron-core's dist-checkpoint load, with a one-line error for a checkpoint that does not match.
    `whole=False` allows requesting part of a tensor (one layer of a stacked layer tensor)."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(request, str(weights), validate_access_integrity=whole)
    except dist_checkpointing.core.CheckpointingException as exc:
        raise ConfigError(f"{weights} does not match its metadata ({str(exc).splitlines()[0][:200]})") from None


def load_model(path: str | Path, p: ParallelConfig, dtype: str | None = None, add_qk_norm: bool = False,
               attention_backend: str | None = None, **build_kwargs):
    """Build this rank's shard of the checkpoint's model at the current TP/PP and load its weights
    (cast to `dtype` when given, e.g. float32 for verification; `attention_backend` overrides the
    stored one, e.g. sdpa for long sequences). `add_qk_norm` gives a checkpoint
    without them the paper's full-width q/k norms, starting at 1 (the QK-norm DroPE variant)."""
    from drope_megatron.model import build_model

    m, new_norms, weights = prepare(path, p, dtype, add_qk_norm, attention_backend)
    model = build_model(m, p, initialize=False, **build_kwargs)
    request = model.sharded_state_dict()
    if new_norms:  # not in the checkpoint: they keep their initial value of 1
        request = {k: v for k, v in request.items() if not k.endswith(NEW_NORMS)}
    missing, unexpected = model.load_state_dict(load_sharded(request, weights), strict=False)
    allowed = NEW_NORMS if new_norms else ()
    bad = [k for k in missing if not k.endswith(allowed) and not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ConfigError(f"{weights} does not fit the model: e.g. {bad[0]}")
    return model, m


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    from drope_megatron.data.tokenizer import SENTENCEPIECE

    if src is None:
        return
    src = Path(src)
    if src.is_file():
        dst.mkdir()
        shutil.copy2(src, dst / SENTENCEPIECE)
    elif src.is_dir() and any(src.iterdir()):
        shutil.copytree(src, dst)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
