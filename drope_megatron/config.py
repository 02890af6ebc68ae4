"""Typed recipe: dataclasses for model, parallelism, training, data and evaluation.

A recipe is a YAML file whose top-level sections match `Recipe`'s fields. Command-line
overrides use dotted keys (`train.lr=1e-4`, `model.rope_layers=[0,3]`), read and type-checked by
`typed_yaml`; `validate` then rejects combinations no run can use. Every problem is reported at
load time as one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from drope_megatron.typed_yaml import ConfigError, apply_override, build, read_yaml


PHASES = ("rope", "drope", "layers")


@dataclass
class RopeScalingConfig:
    """How RoPE frequencies are stretched; `none` is plain RoPE at `model.rotary_base`."""

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn

    def reads(self) -> frozenset[str]:
        """The sub-keys besides `type` that this type of scaling uses."""
        scaled = {"factor", "original_max_position_embeddings"}
        by_type = {"none": set(), "linear": {"factor"}, "llama3": {*scaled, "low_freq_factor", "high_freq_factor"},
                   "yarn": {*scaled, "beta_fast", "beta_slow"}}
        return frozenset(by_type[self.type])


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, GQA) and its positional phase."""

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (one group per head)
    ffn_hidden_size: Optional[int] = None  # None: 8/3 * hidden rounded up to a multiple of 64
    kv_channels: Optional[int] = None  # head_dim; None: hidden_size / num_attention_heads
    vocab_size: int = 8192
    padded_vocab_size: Optional[int] = None  # fixed by a converted checkpoint; None: derived from TP
    seq_length: int = 256  # the training context
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    rotary_base: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Positional phase: rope (pretraining), drope (no positional embedding anywhere),
    # layers (RoPE only in the 0-based layers listed in rope_layers).
    phase: Literal["rope", "drope", "layers"] = "rope"
    rope_layers: Optional[list[int]] = None  # used when phase is "layers"
    qk_norm: bool = False  # the paper's full-width QK-norm variant
    qk_head_norm: bool = False  # per-head q/k RMSNorm over head_dim (Qwen3; megatron's qk_layernorm)
    softmax_scale: Optional[float] = None  # None: head_dim ** -0.5
    attention_backend: Literal["sdpa", "megatron"] = "sdpa"
    # Length-aware temperature, meant for evaluation past the training context: "log_length"
    # scales logits at query position i by max(1, log(i + 1) / log(seq_length)); 1 inside it.
    attention_temperature: Literal["none", "log_length"] = "none"
    # Megatron's torch.compile-fused SwiGLU, and cross-entropy for bf16 models, used only where
    # CUDA is present (compat.kernel_fusions); no weight depends on it.
    fused_kernels: bool = True

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else -(-8 * self.hidden_size // 3 // 64) * 64

    def padded_vocab(self, tp: int) -> int:
        """Megatron pads the vocabulary so every TP rank holds an equal, aligned slice."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism is whatever of the world size is left."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, gloo without
    timeout_minutes: float = 10.0  # a dead or frozen peer ends the job after this long


@dataclass
class TrainConfig:
    """Optimisation of one phase (pretrain with RoPE, or recalibrate without), in a DeepSpeed engine."""

    steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd: length of the final decay
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    global_batch_size: int = 8  # sequences per optimizer step (the paper: 512)
    micro_batch_size: int = 8  # sequences per forward on one data-parallel rank
    seed: int = 1234
    log_interval: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 with CUDA, fp32 without
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO optimizer state in host memory
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON taken as is; "auto" fields filled from here
    init_from: Optional[str] = None  # a Megatron checkpoint (drope convert) to start from
    save_dir: Optional[str] = None  # run directory: checkpoints, metrics.jsonl, the final Megatron checkpoint
    export_hf: Optional[str] = None  # also export the final model as a Hugging Face folder here (a new one)
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept (the final one always is)
    tensorboard: bool = False
    compile_layers: bool = False  # torch.compile each layer (needs Triton on CUDA, a C compiler on CPU)


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenised and packed."""

    paths: list[str] = field(default_factory=list)  # files (text/json/parquet) or Megatron .bin/.idx prefixes
    # auto: from the files (.json/.jsonl json, .parquet, a .bin/.idx prefix megatron, else text);
    # hub: paths[0] is a dataset name.
    format: Literal["auto", "text", "json", "parquet", "megatron", "hub"] = "auto"
    text_key: str = "text"
    tokenizer: Optional[str] = None  # a Hugging Face tokenizer folder or a sentencepiece .model file
    shuffle: bool = True  # documents in a seeded random order, reshuffled every epoch
    # With shuffle: packed blocks mixed within a window of this many (0: the documents' own order).
    shuffle_window: int = 1024
    streaming: bool = False  # stream (hub or very large files) instead of loading an Arrow cache


@dataclass
class EvalConfig:
    """Long-context evaluation: lengths as multiples of the training context (`2x`) or tokens."""

    lengths: list[str] = field(default_factory=lambda: ["1x", "2x", "4x", "8x"])
    # ppl, passkey, niah (every RULER task) or single tasks: niah_single, niah_multikey,
    # niah_multivalue, niah_multiquery, vt
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    baselines: list[Literal["pi", "ntk", "yarn"]] = field(default_factory=list)
    seed: int = 0
    data: list[str] = field(default_factory=list)  # held-out long documents (text, json/jsonl, parquet)
    text_key: str = "text"
    documents: int = 8  # documents per length for perplexity
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4  # retrieval prompts per (task, length, depth)


@dataclass
class Recipe:
    """A whole run: what model, how parallel, how trained, on what, evaluated how."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def rope_flags(phase: str, num_layers: int, rope_layers: Optional[list[int]] = None) -> list[bool]:
    """Which of the num_layers layers (0-based) apply RoPE in `phase`."""
    if phase not in PHASES:
        raise ValueError(f"unknown positional phase {phase!r}: use one of {', '.join(PHASES)}")
    if phase == "rope":
        return [True] * num_layers
    if phase == "drope":
        return [False] * num_layers
    if not rope_layers:
        raise ValueError("phase 'layers' needs rope_layers, the 0-based layers that keep RoPE")
    bad = [i for i in rope_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"rope_layers {bad} are outside 0..{num_layers - 1}")
    return [i in set(rope_layers) for i in range(num_layers)]


def load_recipe(path: str | Path | None, overrides: list[str] = (), resolve_init: bool = True) -> Recipe:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate. Once
    `train.init_from` names an existing checkpoint, the model is that checkpoint's with the
    recipe's settings over it (`init_from.resolve`); `resolve_init=False` reads the file only."""
    raw = raw_recipe(path, overrides)
    recipe = build(Recipe, raw, "")
    own = not recipe.train.init_from  # else the checkpoint's scaling (init_from checks the sub-keys)
    if resolve_init and recipe.train.init_from:
        from drope_megatron.checkpoint import is_checkpoint
        from drope_megatron.init_from import resolve

        own = not is_checkpoint(recipe.train.init_from)  # not there yet: the recipe's model is built
        # Before any check: the checkpoint's heads and layers, not the defaults, meet this TP and rope_layers.
        recipe.model = resolve(recipe.model, raw.get("model") or {}, recipe.train.init_from)
    if own:
        _refuse_unread_scaling(recipe.model.rope_scaling)
    validate(recipe)
    return recipe


def raw_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """A recipe as written: the YAML file (or nothing) with the overrides applied, before defaults."""
    raw: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return raw


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from stored data (checkpoint metadata), type-checked like a recipe."""
    return build(ModelConfig, raw, "model.")


def validate(recipe: Recipe) -> None:
    """Reject combinations no run can use; each check names its key."""
    m, p, t = recipe.model, recipe.parallel, recipe.train
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.vocab_size": m.vocab_size,
        "model.seq_length": m.seq_length, "model.ffn_hidden_size": m.ffn_size,
        "model.kv_channels" if m.kv_channels is not None else "model.hidden_size / num_attention_heads": m.head_dim,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "parallel.timeout_minutes": p.timeout_minutes, "train.steps": t.steps, "train.lr": t.lr,
        "train.global_batch_size": t.global_batch_size, "train.micro_batch_size": t.micro_batch_size,
        "model.rotary_base": m.rotary_base, "model.norm_epsilon": m.norm_epsilon,
        "train.log_interval": t.log_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    _check(m.num_query_groups is None or m.num_query_groups > 0, "model.num_query_groups must be positive")
    _check(m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
           f"{m.num_attention_heads}: set model.kv_channels (head_dim) explicitly")
    _check(m.num_attention_heads % m.groups == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
           f"model.num_query_groups={m.groups}")
    tp = p.tensor_model_parallel_size
    _check(m.groups % tp == 0,
           f"model.num_query_groups={m.groups} is not divisible by parallel.tensor_model_parallel_size={tp}")
    _check(m.num_layers % p.pipeline_model_parallel_size == 0,
           f"model.num_layers={m.num_layers} is not divisible by "
           f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}")
    _check(m.ffn_size % tp == 0, f"model.ffn_hidden_size={m.ffn_size} is not divisible by TP={tp}")
    _check(not (m.qk_norm and m.qk_head_norm), "model.qk_norm and model.qk_head_norm exclude each other")
    if m.padded_vocab_size is not None:
        _check(m.padded_vocab_size >= m.vocab_size and m.padded_vocab_size % tp == 0,
               f"model.padded_vocab_size={m.padded_vocab_size} must be >= model.vocab_size and divisible by "
               f"TP={tp}: convert the checkpoint again with --tp {tp}")
    _validate_phase(m)
    _validate_rope_scaling(m)
    _check(m.softmax_scale is None or m.softmax_scale > 0, "model.softmax_scale must be positive")
    _check(m.attention_temperature == "none" or m.attention_backend == "sdpa",
           "model.attention_temperature needs model.attention_backend=sdpa")
    _check(m.attention_temperature == "none" or m.seq_length >= 2,
           "model.attention_temperature=log_length needs model.seq_length >= 2 (it divides by log(seq_length))")
    _check(t.global_batch_size % t.micro_batch_size == 0,
           f"train.global_batch_size={t.global_batch_size} is not a multiple of "
           f"train.micro_batch_size={t.micro_batch_size}")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be within [0, 1]")
    _check(t.warmup_steps >= 0 and t.decay_steps >= 0, "train.warmup_steps and train.decay_steps must be >= 0")
    _check(t.warmup_steps + t.decay_steps <= t.steps,
           f"train.warmup_steps + train.decay_steps exceed train.steps={t.steps}")
    _check(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
    _check(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1,
           "train.adam_beta1 and train.adam_beta2 must be within [0, 1)")
    _check(t.adam_eps >= 0 and t.weight_decay >= 0, "train.adam_eps and train.weight_decay must be >= 0")
    _check(0 <= t.seed < 2**63, f"train.seed={t.seed} must be within [0, 2**63) (it seeds numpy and torch)")
    _check(m.init_method_std >= 0, f"model.init_method_std={m.init_method_std} must be >= 0")
    # Keys the chosen schedule never reads would be silently ignored.
    _check(t.schedule == "wsd" or t.decay_steps == 0, f"train.decay_steps={t.decay_steps} has no effect with "
           f"train.schedule={t.schedule} (it decays over the whole run): drop it or set train.schedule=wsd")
    _check(t.schedule != "constant" or t.min_lr_ratio == TrainConfig.min_lr_ratio, f"train.min_lr_ratio="
           f"{t.min_lr_ratio} has no effect with train.schedule=constant: drop it or set a schedule that decays")
    _check(recipe.data.shuffle_window >= 0, "data.shuffle_window must be >= 0 (0: no block shuffling)")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    _check(not t.offload_optimizer or t.zero_stage > 0 or t.deepspeed_config is not None,  # else: the JSON's stage
           "train.offload_optimizer needs train.zero_stage >= 1")
    _check(t.schedule != "wsd" or t.decay_steps >= 1, "train.schedule=wsd needs train.decay_steps >= 1 (the decay)")
    _check(t.save_interval >= 0 and t.keep_last >= 1, "train.save_interval must be >= 0 and train.keep_last >= 1")
    _validate_eval(recipe.eval, m)


EVAL_TASKS = ("ppl", "passkey", "niah", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


def _validate_eval(e: EvalConfig, m: ModelConfig) -> None:
    for length in e.lengths:
        parse_length(length, m.seq_length, key="eval.lengths")
    bad = [t for t in e.tasks if t not in EVAL_TASKS]
    _check(not bad, f"eval.tasks has {bad[0] if bad else ''!r}: use {', '.join(EVAL_TASKS)}")
    _check(bool(e.lengths) and bool(e.tasks), "eval.lengths and eval.tasks must not be empty")
    _check(all(0.0 <= d <= 1.0 for d in e.depths) and bool(e.depths), "eval.depths must be fractions within 0..1")
    _check(e.documents >= 1 and e.samples >= 1, "eval.documents and eval.samples must be >= 1")
    for key, values in (("eval.lengths", e.lengths), ("eval.depths", e.depths)):  # one column, one curve each
        _check(len(set(values)) == len(values), f"{key} repeats an entry: {values}")
    _check(0 <= e.seed < 2**63, f"eval.seed={e.seed} must be within [0, 2**63) (it seeds torch too)")


def _validate_phase(m: ModelConfig) -> None:
    _check(m.phase != "layers" or bool(m.rope_layers),
           "model.phase=layers needs model.rope_layers, the 0-based layers keeping RoPE (e.g. [0, 3])")
    bad = [i for i in m.rope_layers or [] if not 0 <= i < m.num_layers]
    _check(not bad, f"model.rope_layers has {bad}, outside 0..{m.num_layers - 1}")


def _refuse_unread_scaling(rs: RopeScalingConfig) -> None:
    """A recipe's sub-key that its scaling type does not read would be silently ignored. (Only a
    recipe's: a stored model is read as it was saved.)"""
    default = RopeScalingConfig()
    for f in dataclasses.fields(rs):
        value = getattr(rs, f.name)
        _check(f.name == "type" or f.name in rs.reads() or value == getattr(default, f.name),
               f"model.rope_scaling.{f.name}={value} has no effect with model.rope_scaling.type={rs.type}: "
               "drop the key or set the type that reads it")


def _validate_rope_scaling(m: ModelConfig) -> None:
    rs = m.rope_scaling
    if rs.type == "none":
        return
    _check(rs.factor >= 1.0, f"model.rope_scaling.factor={rs.factor} must be >= 1")
    if rs.type in ("llama3", "yarn"):
        original = rs.original_max_position_embeddings
        _check(original is not None and original > 0, f"model.rope_scaling.type={rs.type} needs a positive "
               "model.rope_scaling.original_max_position_embeddings")
    # Both pairs bound a band of wavelengths and divide by their difference or by each.
    if rs.type == "llama3":
        _check(0 < rs.low_freq_factor < rs.high_freq_factor, "model.rope_scaling needs 0 < low_freq_factor < "
               f"high_freq_factor (has {rs.low_freq_factor} and {rs.high_freq_factor}; Llama 3.1: 1 and 4)")
    if rs.type == "yarn":
        _check(0 < rs.beta_slow < rs.beta_fast, "model.rope_scaling needs 0 < beta_slow < beta_fast "
               f"(has {rs.beta_slow} and {rs.beta_fast}; YaRN's: 1 and 32)")


def parse_length(text: str, train_length: int, key: str = "length") -> int:
    """'4x' -> 4 * train_length; '8192' -> 8192."""
    try:
        tokens = round(float(text[:-1]) * train_length) if text.endswith("x") else int(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key} entry {text!r} is neither a multiple like 4x nor a token count") from None
    if tokens <= 0:
        raise ConfigError(f"{key} entry {text!r} must be positive")
    return tokens


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
