"""`drope convert verify`: run a Hugging Face model and a Megatron checkpoint on the same tokens.

Works at any TP/PP (launch TP*PP processes): the Megatron logits come out of the pipeline
schedule on the last stage, where the Hugging Face model runs too. Both compute in fp32
unless asked otherwise, so the comparison measures the conversion, not rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from drope_megatron import atomic, distributed, dtypes
from drope_megatron.config import ConfigError, ParallelConfig
from drope_megatron.convert.hf_to_megatron import load_config
from drope_megatron.convert.safetensors_io import SafetensorsReader
from drope_megatron import checkpoint
from drope_megatron.model.pipeline import forward_logits


def verify(hf_dir: Path, meg_dir: Path, tp: int = 1, pp: int = 1, batch: int = 2, length: int = 64,
           seed: int = 0, dtype: str = "float32", report: Path | None = None) -> dict | None:
    """Returns {max_abs_diff, mean_abs_diff, top1_agreement, ...} on the comparing rank, None elsewhere."""
    from transformers import AutoModelForCausalLM

    meta = checkpoint.read_meta(meg_dir)
    _same_shape(load_config(Path(hf_dir)), meta["model"], hf_dir, meg_dir)
    SafetensorsReader(Path(hf_dir))  # refuses a folder without readable weights, before any work
    if batch < 1 or length < 1:
        raise ConfigError(f"--batch and --length must be at least 1 (got {batch} and {length})")
    vocab = meta["model"]["vocab_size"]
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    with distributed.session(parallel, seed) as env:
        if env.world_size != tp * pp:
            raise ConfigError(f"verify at TP={tp} PP={pp} needs {tp * pp} processes, got {env.world_size}")
        device = distributed.compute_device()  # the model loads on the host; NCCL and rotary want the GPU
        model, _ = checkpoint.load_model(meg_dir, parallel, gather_logits=True, dtype=dtype)
        tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
        ours = forward_logits(model.eval().to(device), tokens.to(device))
        if ours is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtypes.to_torch(dtype), trust_remote_code=False)
        with torch.no_grad():
            theirs = hf.eval().to(device)(tokens.to(device)).logits.float().cpu()
        ours = ours[..., :vocab].float().cpu()
        diff = (ours - theirs).abs()
        result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                  "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
                  "tokens": batch * length, "tp": tp, "pp": pp, "dtype": dtype,
                  "hf_architecture": type(hf).__name__}
        if report is not None:
            atomic.write_json(report, result)
        return result


def _same_shape(cfg, m: dict, hf_dir: Path, meg_dir: Path) -> None:
    """Two models of other shapes are not a conversion to check (and would fail to run side by side)."""
    for ours, name in (("vocab_size", "vocab_size"), ("num_layers", "num_hidden_layers"),
                       ("hidden_size", "hidden_size")):
        theirs = getattr(cfg, name, None)
        if theirs != m[ours]:
            raise ConfigError(f"{hf_dir} has {name}={theirs} but {meg_dir} has {ours}={m[ours]}: they are not the "
                              "same model; pass the folder the checkpoint was converted from (or exported to)")
