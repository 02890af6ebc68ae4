"""The project's Megatron checkpoint: a megatron-core dist checkpoint plus a small metadata file.

    CKPT/
      drope_checkpoint.json   model config (ModelConfig), padded vocab, source architecture, dtype
      weights/                megatron-core `dist_checkpointing` (torch_dist): loads at any TP/PP;
                              a streamed conversion writes it in parts instead: part-NNN/ dist
                              checkpoints plus parts.json, which names the keys each part holds
      tokenizer/              the model's tokenizer files, when it has them

Writes go to a temporary sibling folder renamed into place at the end, so a reader never sees
half a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from drope_megatron import atomic, dtypes, safe_metadata
from drope_megatron.config import (ConfigError, ModelConfig, ParallelConfig, Recipe, model_config_from_dict,
                                   validate)
from drope_megatron.typed_yaml import first_line

META = "drope_checkpoint.json"
FORMAT = "drope-megatron/1"
PARTS = "parts.json"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


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
    import torch.distributed as dist  # here, so metadata readers (recipe loading) import nothing heavy
    from megatron.core import dist_checkpointing

    dst = Path(dst)
    tmp = atomic.staging_dir(dst)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    _barrier()
    try:
        with _results_in_process():
            dist_checkpointing.save(sharded if sharded is not None else model.sharded_state_dict(),
                                    str(tmp / "weights"))
        if rank0:
            # The live model is the truth for what it computes: its padding and its current phase.
            m = dataclasses.replace(m, padded_vocab_size=model.vocab_size, phase=model.phase,
                                    rope_layers=model.rope_layers if model.phase == "layers" else m.rope_layers)
            _publish(tmp, dst, m, extra, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return dst


def save_in_parts(parts: Iterable[dict], m: ModelConfig, dst: str | Path, extra: dict[str, Any] | None = None,
                  tokenizer: Path | None = None) -> Path:
    """One process writes a checkpoint from sharded state dicts that arrive one after another (a
    layer each, say), so that no more than one of them is in memory; `m.padded_vocab_size` set."""
    from megatron.core import dist_checkpointing

    dst = Path(dst)
    tmp = atomic.staging_dir(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    try:
        manifest = {}
        with _results_in_process():
            for i, sharded in enumerate(parts):
                name = f"part-{i:03d}"
                (tmp / "weights" / name).mkdir()
                manifest[name] = sorted(sharded)
                # A part holds some layers of the stacked layer tensors: not the whole of them.
                dist_checkpointing.save(_explicit_layer_axis(sharded), str(tmp / "weights" / name),
                                        validate_access_integrity=False)
        (tmp / "weights" / PARTS).write_text(json.dumps({"parts": manifest}, indent=1) + "\n")
        _publish(tmp, dst, m, extra, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


@contextlib.contextmanager
def _results_in_process():
    """megatron-core's writer returns each save's results through a queue served by a spawned
    manager process, which its asynchronous saves need; that process imports torch to read the
    first result, about 2 s each run. These saves are synchronous: the results stay in-process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", ()) is not None:  # made already, or another layout
        yield
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


def _explicit_layer_axis(sharded: dict) -> dict:
    """The same chunks with the stacked layer axis as a real axis of the data. megatron-core writes
    a tensor with a prepended axis through a path that wants every layer present in one save;
    written this way, a layer goes through the path that writes what is there, and reads back
    through either."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    def explicit(x):
        if not isinstance(x, ShardedTensor) or not x.prepend_axis_num:
            return x
        ones = (1,) * x.prepend_axis_num
        return dataclasses.replace(x, data=x.data.view(ones + tuple(x.data.shape)), prepend_axis_num=0,
                                   local_shape=ones + tuple(x.local_shape))

    apply_factories(sharded)  # fused SwiGLU's factory becomes its two halves
    return dict_list_map_inplace(explicit, sharded)


def _publish(tmp: Path, dst: Path, m: ModelConfig, extra: dict[str, Any] | None, tokenizer: Path | None) -> None:
    meta = {"format": FORMAT, "model": dataclasses.asdict(m), **(extra or {})}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    _copy_tokenizer(tokenizer, tmp / "tokenizer")
    atomic.publish_dir(tmp, dst)


def sharded_keys(m: ModelConfig, p: ParallelConfig) -> dict:
    """Each parameter's (and extra state's) sharded description at this TP/PP, keyed by parameter
    name, from a copy of the model on the meta device, which costs no memory."""
    import torch

    from drope_megatron.model import build_model

    with torch.device("meta"):
        layout = build_model(m, p, initialize=False)
    return layout.sharded_state_dict()


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first layer (state-dict keys number a stage's layers from 0)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers else 0


def piece_of(key: str) -> int | str:
    """What a streamed read or write handles together: a layer's keys (its index), or one key."""
    match = _LAYER.match(key)
    return int(match.group(1)) if match else key


def _global_key(key: str, offset: int) -> str:
    match = _LAYER.match(key)
    return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match and offset else key


NEW_NORMS = ("q_layernorm.weight", "k_layernorm.weight")  # the QK-norm variant's weights, absent from a plain checkpoint


def runtime_options(m: ModelConfig) -> dict[str, Any]:
    """The options a recipe sets that change no weights (training context, softmax scale,
    length-aware temperature, fused kernels, attention backend): a run starting from a checkpoint
    applies them over the stored ones (`init_from.resolve` has filled in the stored ones it keeps)."""
    chosen = {"seq_length": m.seq_length, "softmax_scale": m.softmax_scale,
              "attention_temperature": m.attention_temperature, "fused_kernels": m.fused_kernels,
              "attention_backend": m.attention_backend}
    return {k: v for k, v in chosen.items() if v not in (None, "none")}


def prepare(path: str | Path, p: ParallelConfig, dtype: str | None = None, add_qk_norm: bool = False,
            attention_backend: str | None = None, attention: dict[str, Any] | None = None
            ) -> tuple[ModelConfig, bool, Path]:
    """The model config to build for loading `path` at this TP/PP, whether q/k norms are new, the
    weights folder. `attention` (from `runtime_options`) replaces the stored ones."""
    m = model_config(path)
    if dtype is not None:
        m.params_dtype = dtype
    if attention_backend is not None:
        m.attention_backend = attention_backend
    m = dataclasses.replace(m, **(attention or {}))
    new_norms = add_qk_norm and not m.qk_norm
    if new_norms:
        if m.qk_head_norm:
            raise ConfigError("the checkpoint has per-head q/k norms (Qwen3); the full-width QK-norm variant "
                              "replaces them and cannot start from it")
        m.qk_norm = True
    validate(Recipe(model=m, parallel=p))
    weights = Path(path) / "weights"
    if not (weights / "metadata.json").is_file() and not (weights / PARTS).is_file():
        raise ConfigError(f"{weights} is missing or incomplete: the checkpoint is damaged")
    return m, new_norms, weights


def load_sharded(request: dict, weights: Path, whole: bool = True, offset: int = 0) -> dict:
    """megatron-core's dist-checkpoint load, with a one-line error for a checkpoint that does not match.
    `whole=False` allows requesting part of a tensor (one layer of a stacked layer tensor); `offset`
    is the requesting stage's `layer_offset` (it finds the layers in a checkpoint written in parts).
    Objects (a layer's `_extra_state`) are never read: megatron-core unpickles them with torch.load
    unrestricted, so a crafted checkpoint would run code; these layers keep no extra state."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    request = {key: spec for key, spec in request.items() if not isinstance(spec, ShardedObject)}
    if not (weights / PARTS).is_file():
        return _load(request, weights, whole) if whole else _load_part(request, weights)
    parts = json.loads((weights / PARTS).read_text())["parts"]
    strays = [part for part in parts if Path(part).name != part or part in ("", ".", "..")]
    if strays:  # a part is a folder of its own beside the list, never a path elsewhere
        raise ConfigError(f"{weights / PARTS} names {strays[0]!r}, not a folder beside it: the checkpoint is damaged")
    where = {key: part for part, keys in parts.items() for key in keys}
    groups: dict[str, dict] = {}
    missing = []
    for key, spec in request.items():
        # A tied output layer on the last pipeline stage is the embedding under another name.
        part = where.get(_global_key(key, offset)) or where.get(getattr(spec, "key", None))
        if part is None:
            missing.append(_global_key(key, offset))
        groups.setdefault(part, {})[key] = spec
    loaded = {}
    for part in _parts_to_read(groups, missing, weights):
        loaded.update(_load_part(groups.get(part, {}), weights / part))
    return loaded


def _parts_to_read(groups: dict, missing: list[str], weights: Path) -> list[str]:
    """Every rank's needed parts, in one order: megatron's load is collective, so a rank that
    needs nothing from a part (another pipeline stage's layers) still joins its read. A key no
    part holds, on any rank, fails every rank at once rather than leaving the others waiting."""
    import torch.distributed as dist

    needed = sorted(part for part in groups if part is not None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (needed, missing))
        needed = sorted(set().union(*(n for n, _ in everyone)))
        missing = [key for _, keys in everyone for key in keys]
    if missing:
        raise ConfigError(f"{weights} has no {missing[0]}: the checkpoint does not fit the model")
    return needed


def _load_part(request: dict, folder: Path) -> dict:
    """Read some layers of a checkpoint, whole or in parts, into the request's tensors. megatron-core
    reads a layer-stacked tensor with a prepended axis only whole (it expects every layer in a
    request); with the layer axis explicit, any layers can be read."""
    # Reading the explicit-axis views fills the requested tensors in place.
    targets = {key: spec.data for key, spec in request.items()}
    _load(_explicit_layer_axis(dict(request)), folder, whole=False)
    return targets


def _load(request: dict, weights: Path, whole: bool) -> dict:
    from megatron.core import dist_checkpointing

    safe_metadata.vet(weights)  # the index megatron-core unpickles next, exactly this one
    try:
        return dist_checkpointing.load(request, str(weights), validate_access_integrity=whole)
    except dist_checkpointing.core.CheckpointingException as exc:
        raise ConfigError(f"{weights} does not match its metadata ({first_line(exc)[:200]})") from None


def load_model(path: str | Path, p: ParallelConfig, dtype: str | None = None, add_qk_norm: bool = False,
               attention_backend: str | None = None, attention: dict[str, Any] | None = None, **build_kwargs):
    """Build this rank's shard of the checkpoint's model at the current TP/PP and load its weights
    (cast to `dtype` when given, e.g. float32 for verification; `attention_backend` overrides the
    stored one, e.g. sdpa for long sequences). `add_qk_norm` gives a checkpoint
    without them the paper's full-width q/k norms, starting at 1 (the QK-norm DroPE variant);
    `attention` replaces the stored ones (see `prepare`)."""
    from drope_megatron.model import build_model

    m, new_norms, weights = prepare(path, p, dtype, add_qk_norm, attention_backend, attention)
    model = build_model(m, p, initialize=False, **build_kwargs)
    request = model.sharded_state_dict()
    if new_norms:  # not in the checkpoint: they keep their initial value of 1
        request = {k: v for k, v in request.items() if not k.endswith(NEW_NORMS)}
    missing, unexpected = model.load_state_dict(load_sharded(request, weights, offset=layer_offset(model)),
                                                strict=False)
    allowed = NEW_NORMS if new_norms else ()
    bad = [k for k in missing if not k.endswith(allowed) and not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ConfigError(f"{weights} does not fit the model: e.g. {bad[0]}")
    # megatron's norms are made in fp32 whatever params_dtype says (Megatron-LM casts its whole model,
    # DeepSpeed does in training): bf16 activations against fp32 norm weights miss torch's fused norm.
    return model.to(dtype=dtypes.to_torch(m.params_dtype)), m


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    """The tokenizer's files only: `src` may be a whole model folder (`data.tokenizer` can point at one)."""
    from drope_megatron.data.tokenizer import SENTENCEPIECE, TOKENIZER_FILES

    if src is None:
        return
    src = Path(src)
    if src.is_file():
        dst.mkdir()
        shutil.copy2(src, dst / SENTENCEPIECE)
    elif src.is_dir() and any((src / name).is_file() for name in TOKENIZER_FILES):
        dst.mkdir()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
