"""`drope convert megatron-to-hf`: the project's Megatron checkpoint -> a Hugging Face folder.

A RoPE model goes back to its source architecture; a DroPE (or per-layer) model becomes a
stock `SmolLM3ForCausalLM` with `no_rope_layers`, loadable by `AutoModelForCausalLM` without
`trust_remote_code`. The checkpoint is read one layer at a time and each tensor goes straight into its
shard's file (the shards are planned from the config first), so memory holds two layers (the next
is read while this one is converted), whatever the shard size; vocabulary padding is cut off.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from drope_megatron import atomic, dtypes
from drope_megatron.config import ParallelConfig, rope_flags
from drope_megatron.convert import hf_config, hf_tokenizer, tensors
from drope_megatron.convert.read_ahead import read_ahead
from drope_megatron.convert.safetensors_io import INDEX, ShardedWriter
from drope_megatron import checkpoint


def _an_export(folder: Path) -> bool:
    """Only files an export writes: a Hugging Face model folder holds others (its README, scripts)."""
    from drope_megatron.data.tokenizer import TOKENIZER_FILES

    names = {"config.json", INDEX, *TOKENIZER_FILES}
    return all(p.name in names or (p.name.startswith("model") and p.suffix == ".safetensors")
               for p in folder.iterdir())


def export(src: Path, dst: Path, arch: str = "auto", dtype: str = "auto", overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30, show_progress: bool = True) -> str:
    """Write the Hugging Face folder; returns a one-line description of what was written."""
    src, dst = Path(src), Path(dst)
    atomic.refuse_existing(dst, overwrite, owned=_an_export)
    meta = checkpoint.read_meta(src)
    m = checkpoint.model_config(src)
    if arch == "auto":
        arch = "source" if m.phase == "rope" else "nope"
    out_dtype = dtypes.to_torch(m.params_dtype if dtype == "auto" else dtype)
    given = (meta.get("source") or {}).get("hf_config", {})
    token_ids = _token_ids(src) if given.get("eos_token_id") is None else None
    cfg, family = hf_config.hf_config_for_export(m, arch, meta.get("source"), out_dtype, token_ids)
    from drope_megatron import distributed  # megatron-core loads only once the input is known good

    staging = atomic.staging_dir(dst)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with distributed.session(single=True):
            # A family without Qwen2's own qkv biases carries them as attention_bias, which adds o's too.
            zero_o_bias = m.qkv_bias and not family.qkv_bias
            keys = _weight_keys(m)
            plan = _hf_plan(keys, m, zero_o_bias, out_dtype)
            with ShardedWriter(staging, plan, max_shard_bytes) as writer, \
                    read_ahead(_read_by_layer(src, keys)) as layers:
                _write_tensors(layers, m, zero_o_bias, writer, out_dtype, show_progress)
        if (src / "tokenizer").is_dir():  # first: nothing in it may replace the model's own files
            hf_tokenizer.copy_tokenizer(src / "tokenizer", staging)
        cfg.save_pretrained(str(staging))
        atomic.publish_dir(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    flags = rope_flags(m.phase, m.num_layers, m.rope_layers)
    detail = f" with no_rope_layers={[int(f) for f in flags]}" if family.per_layer_nope else ""
    return f"wrote {family.architecture}{detail} ({dtypes.name_of(out_dtype)}) to {dst}"


def _token_ids(src: Path) -> dict[str, int | None] | None:
    """bos/eos of the checkpoint's own tokenizer, for the ids its source config does not give (a
    model trained here has none; the demo's shipped model leaves them null): without an EOS id,
    `generate` would never stop."""
    folder = src / "tokenizer"
    # A converted model's folder may hold only generation_config.json (its source had no tokenizer).
    if not any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")):
        return None
    from drope_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(src / "tokenizer")
    return {"bos_token_id": tok.bos[0] if tok.bos else None, "eos_token_id": tok.eos_id, "pad_token_id": None}


def _weight_keys(m) -> dict:
    """The checkpoint's tensors (not its extra-state objects), described on the meta device, in order."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in checkpoint.sharded_keys(m, ParallelConfig()).items() if not isinstance(v, ShardedObject)}


def _hf_plan(keys: dict, m, zero_o_bias: bool, dtype: torch.dtype) -> list:
    """Every Hugging Face tensor the export writes, with its shape and dtype, in the order written."""
    shapes = tensors.Shapes.of(m, m.padded_vocab_size)
    plan = []
    for name, spec in keys.items():
        rule = tensors.mapping_for(name)
        hf_shapes = tensors.expected_hf_shapes(rule.how, tuple(spec.data.shape), shapes)
        plan += [(hf_name, shape, dtype) for hf_name, shape in zip(rule.hf, hf_shapes)]
        if zero_o_bias and rule.how == "qkv" and name.endswith(".bias"):
            plan.append((_o_bias(rule), (m.hidden_size,), dtype))
    return plan


def _o_bias(rule: tensors.Mapping) -> str:
    return rule.hf[0].replace("q_proj", "o_proj")


def _read_by_layer(src: Path, keys: dict):
    """{name: tensor} of each layer's parameters in turn (the embedding, final norm and output
    layer each on their own), reading the checkpoint one layer at a time."""
    _, _, weights = checkpoint.prepare(src, ParallelConfig())
    for _, items in itertools.groupby(keys.items(), key=lambda kv: checkpoint.piece_of(kv[0])):
        request = {name: dataclasses.replace(spec, data=torch.empty(spec.data.shape, dtype=spec.data.dtype))
                   for name, spec in items}
        loaded = checkpoint.load_sharded(request, weights, whole=False)
        yield {name: loaded[name] for name in request}  # the plan's order, whatever the read's


def _write_tensors(layers, m, zero_o_bias: bool, writer: ShardedWriter, dtype: torch.dtype, show_progress: bool):
    shapes = tensors.Shapes.of(m, m.padded_vocab_size)
    named = (item for layer in layers for item in layer.items())
    for name, tensor in tqdm(named, desc="megatron -> hf", unit="tensor", disable=not show_progress):
        rule = tensors.mapping_for(name)
        for hf_name, hf_tensor in zip(rule.hf, tensors.to_hf(rule.how, tensor, shapes)):
            writer.add(hf_name, hf_tensor.to(dtype))
        if zero_o_bias and rule.how == "qkv" and name.endswith(".bias"):
            writer.add(_o_bias(rule), torch.zeros(m.hidden_size, dtype=dtype))
