"""`drope convert hf-to-megatron`: a Hugging Face folder -> the project's Megatron checkpoint.

Tensors stream from the safetensors shards one layer at a time into a checkpoint written in
parts (`checkpoint.save_in_parts`): the model is never whole in memory, only the layer being
written and the next, read meanwhile. Every Hugging Face tensor must be used exactly once and
have the shape the config implies.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from drope_megatron import atomic, checkpoint, dtypes
from drope_megatron.config import ConfigError, ParallelConfig, Recipe, validate
from drope_megatron.convert import hf_config, tensors
from drope_megatron.convert.families import family_for
from drope_megatron.convert.read_ahead import read_ahead
from drope_megatron.convert.safetensors_io import SafetensorsReader
from drope_megatron.typed_yaml import first_line

IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
ZERO_O_BIAS = ".self_attn.o_proj.bias"  # attention_bias=True as this project exports it: all zero


def load_config(src: Path):
    """The folder's transformers config (never remote code), or a one-line error."""
    from transformers import AutoConfig

    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} has no config.json: pass a local Hugging Face model folder")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    # OSError: transformers' word for invalid JSON; StrictDataclassError: a field of the wrong type.
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        raise ConfigError(f"{src}/config.json cannot be read by transformers ({first_line(exc)})") from None


# How `drope convert` names what a recipe calls by its keys: its flags and the source's config.json.
_FLAG_NAMES = {"parallel.tensor_model_parallel_size": "--tp", "parallel.pipeline_model_parallel_size": "--pp",
               "model.num_query_groups": "num_key_value_heads", "model.num_layers": "num_hidden_layers",
               "model.ffn_hidden_size": "intermediate_size", "model.": ""}


def read_source(src: Path, allow_sliding_window: bool):
    cfg = load_config(src)
    family = family_for(cfg.model_type)
    return cfg, family, hf_config.model_config_from_hf(cfg, family, allow_sliding_window)


def convert(src: Path, dst: Path, tp: int = 1, pp: int = 1, dtype: str = "auto", overwrite: bool = False,
            allow_sliding_window: bool = False, show_progress: bool = True) -> Path:
    src, dst = Path(src), Path(dst)
    atomic.refuse_existing(dst, overwrite, checkpoint.META)
    cfg, family, m = read_source(src, allow_sliding_window)
    reader = SafetensorsReader(src)
    torch_dtype = _stored_dtype(cfg, reader) if dtype == "auto" else dtypes.to_torch(dtype)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    m.params_dtype = dtypes.name_of(torch_dtype)
    try:  # TP/PP divisibility, before any work
        validate(Recipe(model=m, parallel=parallel))
    except ConfigError as exc:
        raise exc.renamed(_FLAG_NAMES) from None
    m.padded_vocab_size = m.padded_vocab(tp)
    # Tensors with no Megatron counterpart that are taken as what they must be (checked now).
    accepted = (_zero_o_biases(reader) if getattr(cfg, "attention_bias", False) else set()) | \
        _tied_duplicate(reader, m.tie_embeddings)
    # megatron-core loads only now: bad input is refused in a blink.
    from drope_megatron import distributed

    try:
        with distributed.session(single=True):
            keys = checkpoint.sharded_keys(m, ParallelConfig())
            parts = _parts(keys, reader, tensors.Shapes.of(m, m.padded_vocab_size), accepted, show_progress)
            extra = {"source": hf_config.source_record(cfg, family), "written_for": {"tp": tp, "pp": pp}}
            with read_ahead(parts) as stream:
                # The source folder's tokenizer and generation files travel; its weights and config do not.
                checkpoint.save_in_parts(stream, m, dst, extra=extra, tokenizer=src)
    except BaseException:
        shutil.rmtree(atomic.staging_dir(dst), ignore_errors=True)  # no partial output
        raise
    return dst


def _stored_dtype(cfg, reader: SafetensorsReader) -> torch.dtype:
    """The checkpoint's dtype as its config names it (a first tensor kept in fp32, a norm or an old
    inv_freq buffer, would make the whole model fp32); the first tensor's without one."""
    named = getattr(cfg, "dtype", None)
    if isinstance(named, torch.dtype) and named in (torch.float32, torch.bfloat16, torch.float16):
        return named
    if isinstance(named, str) and named in dtypes.NAMES:
        return dtypes.to_torch(named)
    stored = reader.dtype()
    if dtypes.name_of(stored) not in dtypes.NAMES:
        raise ConfigError(f"the weights are {stored} and config.json names no dtype: pass --dtype "
                          f"({', '.join(dtypes.NAMES)})")
    return stored


def _parts(keys: dict, reader: SafetensorsReader, shapes: tensors.Shapes, accepted: set[str], show_progress: bool):
    """The sharded state dict one layer at a time (the embedding, final norm and output layer each
    on their own), filled from the Hugging Face tensors."""
    from megatron.core.dist_checkpointing import ShardedObject

    # Before any work: a tensor with no place (an FP8 scale, an unsupported part) refuses the source.
    used = {h for name, spec in keys.items() if not isinstance(spec, ShardedObject)
            for h in tensors.mapping_for(name).hf} | accepted
    unused = [n for n in reader.names() if n not in used and not n.endswith(IGNORED)]
    if unused:
        raise ConfigError(f"{len(unused)} tensor(s) of the checkpoint have no place in the model, e.g. {unused[0]}: "
                          "the architecture has parts this conversion does not support")
    bar = tqdm(total=len(keys), desc="hf -> megatron", unit="tensor", disable=not show_progress)
    done_bytes = 0
    for _, items in itertools.groupby(keys.items(), key=lambda kv: checkpoint.piece_of(kv[0])):
        part = {}
        for name, spec in items:
            bar.update()
            if isinstance(spec, ShardedObject):  # a layer's `_extra_state`: written as described
                part[name] = spec
                continue
            # The model's own dtype per tensor: megatron keeps some (norms) in fp32 under a bf16 model.
            data = _tensor(name, tuple(spec.data.shape), reader, shapes, spec.data.dtype)
            part[name] = dataclasses.replace(spec, data=data)
            done_bytes += data.numel() * data.element_size()
            bar.set_postfix(MiB=f"{done_bytes / 2**20:.0f}")
        yield part
    bar.close()


def _tensor(name: str, shape: tuple, reader: SafetensorsReader, shapes: tensors.Shapes, dtype: torch.dtype):
    """The Megatron tensor `name` of `shape`, made from its Hugging Face tensors."""
    rule = tensors.mapping_for(name)
    parts = [reader.get(h) for h in rule.hf]
    for hf_name, part, expected in zip(rule.hf, parts, tensors.expected_hf_shapes(rule.how, shape, shapes)):
        if tuple(part.shape) != expected:
            raise ConfigError(f"tensor {hf_name} has shape {list(part.shape)} but config.json implies "
                              f"{list(expected)}: the weights do not match the config")
    return tensors.to_megatron(rule.how, [p.to(dtype) for p in parts], shapes).contiguous()


def _zero_o_biases(reader: SafetensorsReader) -> set[str]:
    """o_proj biases (attention_bias=True), which the Megatron model has not: taken only when all zero."""
    names = {n for n in reader.names() if n.endswith(ZERO_O_BIAS)}
    for name in sorted(names):
        if reader.get(name).any():
            raise ConfigError(f"{name} is not zero: the Megatron model has no o_proj bias (attention_bias=True "
                              "converts only with zero o_proj biases, as this project exports them)")
    return names


def _tied_duplicate(reader: SafetensorsReader, tied: bool) -> set[str]:
    """A tied model's lm_head.weight, stored as well by some tools: taken when it is the embedding."""
    if not tied or "lm_head.weight" not in reader.names():
        return set()
    if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise ConfigError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight: "
                          "fix tie_word_embeddings in config.json")
    return {"lm_head.weight"}
