"""The models evaluation runs: a Megatron checkpoint (our model) or a Hugging Face folder (transformers).

Both answer the same three questions: `logits(tokens, keep)` over the model's real vocabulary (in
the model's dtype, padding rows cut; the last `keep` positions only when a caller needs no more),
`use(method, length)` to switch RoPE scaling for a target length, and what the model is (training
length, positional phase, tokenizer).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import torch

from drope_megatron import checkpoint, distributed
from drope_megatron.config import ConfigError, ParallelConfig
from drope_megatron.convert.hf_to_megatron import load_config
from drope_megatron.data.tokenizer import Tokenizer, load_tokenizer
from drope_megatron.eval import scaling
from drope_megatron.typed_yaml import first_line


def model_kind(path: Path) -> str:
    """"megatron" (has drope_checkpoint.json) or "hf" (has config.json)."""
    if checkpoint.is_checkpoint(path):
        return "megatron"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{path} is neither a drope Megatron checkpoint nor a Hugging Face model folder")


def open_backend(path: str | Path, dtype: str | None = None, tp: int = 1):
    path = Path(path)
    if model_kind(path) == "megatron":
        return MegatronBackend(path, dtype, tp)
    return HFBackend(path, dtype)


def _tokenizer(path: Path) -> Tokenizer:
    if not path.is_dir():
        raise ConfigError(f"no tokenizer at {path}: the model needs its tokenizer files to be evaluated")
    return load_tokenizer(path)


class MegatronBackend:
    """Our DropeGPTModel from a Megatron checkpoint, through SDPA attention, full-vocabulary logits on every TP rank."""

    whole_model = False  # split over the TP ranks, which compute each forward together

    def __init__(self, path: Path, dtype: str | None, tp: int):
        self.path = path
        self.model, self.config = checkpoint.load_model(
            path, ParallelConfig(tensor_model_parallel_size=tp), dtype=dtype, attention_backend="sdpa",
            gather_logits=True)
        self.model.eval().to(distributed.compute_device())
        m = self.config
        self.train_length, self.phase, self.vocab_size = m.seq_length, m.phase, m.vocab_size
        self.scaled = None if m.rope_scaling.type == "none" else m.rope_scaling.type
        self.device = next(self.model.parameters()).device

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return _tokenizer(self.path / "tokenizer")

    def use(self, method: str, length: int) -> None:
        m = self.config
        if method != "none" and self.scaled:
            raise ConfigError(f"{self.path} already uses {self.scaled} RoPE scaling: baselines apply to plain "
                              "RoPE models")
        if method == "none":
            self.model.set_rotary(m.rotary_base, m.rope_scaling)
            return
        rotary = scaling.rotary_for(method, m.rotary_base, m.head_dim, self.train_length, length)
        self.model.set_rotary(rotary.base, rotary.scaling)

    def logits(self, tokens: torch.Tensor, keep: int = 0) -> torch.Tensor:
        from drope_megatron.model.pipeline import forward_logits

        out = forward_logits(self.model, tokens.to(self.device), keep)
        return out[:, :, : self.vocab_size]


class HFBackend:
    """A transformers causal LM (never trust_remote_code), SDPA attention."""

    whole_model = True  # every process holds all of it: under --tp each process is a data-parallel rank

    def __init__(self, path: Path, dtype: str | None):
        from transformers import AutoModelForCausalLM

        from drope_megatron import dtypes

        self.path = path
        config = load_config(path)
        torch_dtype = dtypes.to_torch(dtype) if dtype else "auto"
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch_dtype,
                                                              attn_implementation="sdpa", trust_remote_code=False)
        except (OSError, ValueError) as exc:  # no weights, a class transformers lacks, remote code
            raise ConfigError(f"{path} cannot be loaded by transformers ({first_line(exc)})") from None
        self.model.eval().to(distributed.compute_device())
        self.device = next(self.model.parameters()).device
        self.rope = dict(getattr(config, "rope_parameters", None) or {})  # as loaded; "none" restores it
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.base = float(self.rope.get("rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_dim = int(head_dim * self.rope.get("partial_rotary_factor", 1.0))
        # Per-layer-type parameters (Gemma 3: {"sliding_attention": {...}, ...}) are not one rotary to stretch.
        nested = any(isinstance(v, dict) for v in self.rope.values())
        kind = "per-layer-type" if nested else self.rope.get("rope_type", "default")
        self.scaled = None if kind == "default" else kind  # a RoPE scaling the model already has
        self.train_length = hf_train_length(config)
        self.phase = _hf_phase(config, getattr(self.model.base_model, "rotary_emb", None))
        self.vocab_size = config.vocab_size
        self.method = "none"

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return _tokenizer(self.path)

    def use(self, method: str, length: int) -> None:
        if method != "none" and self.scaled:
            raise ConfigError(f"{self.path} already uses {self.scaled} RoPE scaling: baselines apply to plain "
                              "RoPE models")
        if method == self.method == "none":
            return
        config = self.model.config
        # Only the scaling keys change: the rest (partial_rotary_factor of Phi, GPT-NeoX) stays.
        config.rope_parameters = {**self.rope, **scaling.hf_rope_parameters(method, self.base, self.rotary_dim,
                                                                            self.train_length, length)}
        config.max_position_embeddings = self.max_positions if method == "none" else self.train_length
        owner = self.model.base_model
        # A shared rotary module built from rope_parameters (GPT-J's has a fixed table and reads none).
        if not hasattr(getattr(owner, "rotary_emb", None), "rope_type"):
            raise ConfigError(f"{self.path}: {type(self.model).__name__} has no shared rotary module that reads "
                              "rope_parameters, so there is nothing to stretch: evaluate it without --baselines")
        owner.rotary_emb = type(owner.rotary_emb)(config=config).to(self.device)
        self.method = method

    def logits(self, tokens: torch.Tensor, keep: int = 0) -> torch.Tensor:
        with torch.no_grad():  # logits_to_keep: the output layer runs on those positions only
            out = self.model(input_ids=tokens.to(self.device), use_cache=False, logits_to_keep=keep).logits
        return out[..., : self.vocab_size]


def hf_train_length(config) -> int:
    """The context a transformers model was trained at: before any RoPE scaling it has."""
    rope = getattr(config, "rope_parameters", None) or {}
    length = rope.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
    if not length:  # Bloom's config names none
        raise ConfigError(f"{type(config).__name__} names no max_position_embeddings, the training context that "
                          "lengths like 2x multiply: add it to config.json")
    return int(length)


def hf_position_limit(path: Path) -> tuple[int | None, int]:
    """Before any model runs: a folder's config reads (one-line error), and the most positions its
    architecture takes when it holds a table of them (GPT-2's learned one, GPT-J's fixed sin/cos:
    past it, indexing fails), from a weightless copy; None when positions are computed at any
    length (RoPE, ALiBi, none). Also its training length."""
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: transformers cannot build a causal LM from its config ({first_line(exc)})") \
            from None
    limit = getattr(config, "max_position_embeddings", None)
    # OPT's learned table has two rows more than it has positions.
    tables = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
              if _POSITIONS.search(name) and t.dim() >= 1 and limit and limit <= t.shape[0] <= limit + 2]
    return (limit if tables else None), hf_train_length(config)


_POSITIONS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)(\.|$)")


def _hf_phase(config, rotary) -> str:
    """rope, drope (every layer NoPE, e.g. an exported DroPE model), layers, or other: no RoPE at
    all (GPT-2's learned positions, Bloom's and ALiBi Falcon's ALiBi), which the RoPE baselines do
    not apply to. (Falcon builds a rotary module even when it uses ALiBi instead.)"""
    if getattr(config, "alibi", False) or (getattr(config, "rope_parameters", None) is None
                                           and not isinstance(rotary, torch.nn.Module)):
        return "other"
    nope = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 = RoPE, 0 = NoPE
    if nope is None:
        return "rope"
    return "rope" if all(nope) else "drope" if not any(nope) else "layers"


def describe(backend) -> dict:
    return {"path": str(backend.path), "train_length": backend.train_length, "phase": backend.phase,
            "rope_scaling": backend.scaled, "backend": type(backend).__name__}

