"""`drope convert hf-to-megatron`: a Hugging Face folder -> the project's Megatron checkpoint.

Tensors stream one at a time from the safetensors shards into an uninitialised megatron
model (the only full copy in memory), which is then written as a dist checkpoint. Every
Hugging Face tensor must be used exactly once and have the shape the config implies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from drope_megatron import atomic, dtypes
from drope_megatron.config import ConfigError, ParallelConfig, Recipe, validate
from drope_megatron.convert import hf_config, tensors
from drope_megatron.convert.families import family_for
from drope_megatron.convert.safetensors_io import SafetensorsReader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
def read_source(src: Path, allow_sliding_window: bool):
    from transformers import AutoConfig

    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} has no config.json: pass a local Hugging Face model folder")
    try:
        cfg = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{src}/config.json cannot be read by transformers ({str(exc).splitlines()[0]})") from None
    family = family_for(cfg.model_type)
    return cfg, family, hf_config.model_config_from_hf(cfg, family, allow_sliding_window)


def convert(src: Path, dst: Path, tp: int = 1, pp: int = 1, dtype: str = "auto", overwrite: bool = False,
            allow_sliding_window: bool = False, show_progress: bool = True) -> Path:
    src, dst = Path(src), Path(dst)
    atomic.refuse_existing(dst, overwrite)
    cfg, family, m = read_source(src, allow_sliding_window)
    reader = SafetensorsReader(src)
    torch_dtype = reader.dtype() if dtype == "auto" else dtypes.to_torch(dtype)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    m.params_dtype = dtypes.name_of(torch_dtype)
    validate(Recipe(model=m, parallel=parallel))  # TP/PP divisibility, before any work
    m.padded_vocab_size = m.padded_vocab(tp)
    # megatron-core loads only now: bad input is refused in a blink.
    from drope_megatron import checkpoint, distributed
    from drope_megatron.model import build_model

    try:
        with distributed.session(single=True):
            model = build_model(m, ParallelConfig(), initialize=False)
            _fill(model, reader, tensors.Shapes.of(m, m.padded_vocab_size), torch_dtype, show_progress)
            with _staged_tokenizer(src, dst) as tokenizer_dir:
                checkpoint.save(model, m, dst, extra={"source": hf_config.source_record(cfg, family),
                                                      "written_for": {"tp": tp, "pp": pp}},
                                tokenizer=tokenizer_dir)
    except BaseException:
        shutil.rmtree(atomic.staging_dir(dst), ignore_errors=True)  # no partial output
        raise
    return dst


def _fill(model, reader: SafetensorsReader, shapes: tensors.Shapes, dtype: torch.dtype, show_progress: bool):
    used: set[str] = set()
    params = dict(model.named_parameters())
    bar = tqdm(params.items(), desc="hf -> megatron", unit="tensor", disable=not show_progress)
    done_bytes = 0
    for name, param in bar:
        rule = tensors.mapping_for(name)
        parts = [reader.get(h) for h in rule.hf]
        expected = tensors.expected_hf_shapes(rule.how, tuple(param.shape), shapes)
        for hf_name, part, shape in zip(rule.hf, parts, expected):
            if tuple(part.shape) != shape:
                raise ConfigError(f"tensor {hf_name} has shape {list(part.shape)} but config.json implies "
                                  f"{list(shape)}: the weights do not match the config")
        with torch.no_grad():
            param.copy_(tensors.to_megatron(rule.how, [p.to(dtype) for p in parts], shapes))
        used.update(rule.hf)
        done_bytes += param.numel() * param.element_size()
        bar.set_postfix(MiB=f"{done_bytes / 2**20:.0f}")
    unused = [n for n in reader.names() if n not in used and not n.endswith(IGNORED)]
    if unused:
        raise ConfigError(f"{len(unused)} tensor(s) of the checkpoint have no place in the model, e.g. {unused[0]}: "
                          "the architecture has parts this conversion does not support")


class _staged_tokenizer:
    """The source's tokenizer and generation files, gathered in a folder beside the output."""

    def __init__(self, src: Path, dst: Path):
        self.src, self.folder = src, dst.with_name(f".{dst.name}.tokenizer")

    def __enter__(self) -> Path:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            if (self.src / name).is_file():
                shutil.copy2(self.src / name, self.folder / name)
        return self.folder

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
