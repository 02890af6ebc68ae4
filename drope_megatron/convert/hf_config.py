"""Hugging Face config <-> ModelConfig, refusing whatever the other side cannot express.

Import reads a transformers config (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)
into a ModelConfig; export writes the source architecture's config back, or a stock
`SmolLM3ForCausalLM` with per-layer NoPE for DroPE models. Anything that would make the
two sides compute different functions is an error, never a silent approximation.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from drope_megatron import dtypes
from drope_megatron.config import ConfigError, ModelConfig, RopeScalingConfig, rope_flags
from drope_megatron.convert.families import NOPE_EXPORT, Family, family_named

def rope_parameters(cfg) -> dict[str, Any]:
    """{"rope_type", "rope_theta", factor, ...} from either transformers generation of config."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def _rope_scaling(rp: dict[str, Any], max_positions: int) -> RopeScalingConfig:
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return RopeScalingConfig()
    original = rp.get("original_max_position_embeddings")
    if rp.get("factor") is None and not (kind == "yarn" and original):
        raise ConfigError(f"rope_type {kind!r} without a factor: set rope_scaling.factor in config.json")
    # A YaRN factor of null is the context's growth, as transformers reads it (DeepSeek-V3's configs).
    factor = float(rp["factor"]) if rp.get("factor") is not None else max_positions / int(original)
    if kind == "linear":
        return RopeScalingConfig(type="linear", factor=factor)
    if kind == "llama3":
        return RopeScalingConfig(type="llama3", factor=factor, low_freq_factor=float(rp["low_freq_factor"]),
                                 high_freq_factor=float(rp["high_freq_factor"]),
                                 original_max_position_embeddings=int(rp["original_max_position_embeddings"]))
    if kind == "yarn":
        custom = {k: rp[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if rp.get(k) is not None}
        if custom or rp.get("truncate", True) is False:
            raise ConfigError(f"YaRN with custom {sorted(custom) or ['truncate=False']} is not supported: "
                              "only the default attention factor 0.1*ln(factor)+1 maps onto megatron's YaRN")
        return RopeScalingConfig(type="yarn", factor=factor, beta_fast=float(rp.get("beta_fast") or 32.0),
                                 beta_slow=float(rp.get("beta_slow") or 1.0),  # null: the default, as in transformers
                                 original_max_position_embeddings=int(
                                     rp.get("original_max_position_embeddings") or max_positions))
    raise ConfigError(f"rope_type {kind!r} is not supported: use a checkpoint with default, linear, llama3 or "
                      "yarn RoPE (dynamic NTK is an evaluation baseline, not a stored setting)")


def _trained_length(scaling: RopeScalingConfig, max_positions: int) -> int:
    """The context a model was pretrained at: a scaled model's original one, else its table's size."""
    return scaling.original_max_position_embeddings or max_positions


def _refuse_unsupported(cfg, family: Family, allow_sliding_window: bool) -> None:
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={cfg.hidden_act!r} is not supported: the model is built with SwiGLU (silu)")
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError("mlp_bias=True is not supported: megatron's MLP here has no biases")
    window = getattr(cfg, "sliding_window", None)
    active = getattr(cfg, "use_sliding_window", window is not None) and window is not None
    if getattr(cfg, "layer_types", None) is not None:  # Qwen2/3: only layers past max_window_layers slide
        active = window is not None and "sliding_attention" in cfg.layer_types
    if family.sliding_window and active and window < cfg.max_position_embeddings and not allow_sliding_window:
        raise ConfigError(f"the model uses sliding-window attention (window {window}); the Megatron model attends "
                          "to the full context: pass --ignore-sliding-window to convert it anyway")


def model_config_from_hf(cfg, family: Family, allow_sliding_window: bool = False) -> ModelConfig:
    """The ModelConfig computing the same function as this transformers config."""
    _refuse_unsupported(cfg, family, allow_sliding_window)
    rp = rope_parameters(cfg)
    scaling = _rope_scaling(rp, cfg.max_position_embeddings)
    phase, rope_layers = "rope", None
    if family.per_layer_nope:
        flags = [bool(x) for x in cfg.no_rope_layers]
        phase = "rope" if all(flags) else "drope" if not any(flags) else "layers"
        rope_layers = [i for i, f in enumerate(flags) if f] if phase == "layers" else None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=head_dim, vocab_size=cfg.vocab_size,
        seq_length=_trained_length(scaling, cfg.max_position_embeddings),
        # attention_bias adds o_proj's bias too: accepted only all zero, as this project exports it.
        norm_epsilon=float(cfg.rms_norm_eps), qkv_bias=family.qkv_bias or bool(getattr(cfg, "attention_bias", False)),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rotary_base=float(rp.get("rope_theta", 10000.0)), rope_scaling=scaling, phase=phase,
        rope_layers=rope_layers, qk_head_norm=family.qk_head_norm,
    )


def _hf_rope_kwargs(m: ModelConfig) -> dict[str, Any]:
    rs = m.rope_scaling
    if rs.type == "none":
        return {"rope_theta": m.rotary_base, "rope_scaling": None}
    scaling: dict[str, Any] = {"rope_type": rs.type, "factor": rs.factor}
    if rs.type == "llama3":
        scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                       original_max_position_embeddings=rs.original_max_position_embeddings)
    if rs.type == "yarn":
        scaling.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                       original_max_position_embeddings=rs.original_max_position_embeddings)
    return {"rope_theta": m.rotary_base, "rope_scaling": scaling}


def _refuse_inexpressible(m: ModelConfig) -> None:
    if m.qk_norm:
        raise ConfigError("the QK-norm DroPE variant (full-width q/k RMSNorm) has no stock transformers "
                          "architecture; serve it from the Megatron checkpoint")
    if m.softmax_scale is not None and abs(m.softmax_scale - m.head_dim**-0.5) > 1e-12:
        raise ConfigError(f"model.softmax_scale={m.softmax_scale} differs from head_dim**-0.5, which every stock "
                          "transformers architecture uses; refusing to export a different function")
    if m.attention_temperature != "none":
        raise ConfigError("model.attention_temperature is an inference option of this project; stock "
                          "transformers architectures have no equivalent")


def hf_config_for_export(m: ModelConfig, arch: str, source: dict[str, Any] | None,
                         dtype: torch.dtype, token_ids: dict[str, int | None] | None = None):
    """The transformers config to write: the source family's (`arch="source"`) or SmolLM3 NoPE.
    `token_ids` (bos/eos/pad), from the model's own tokenizer, fill those its source leaves unset."""
    from transformers import CONFIG_MAPPING

    _refuse_inexpressible(m)
    if source:
        family = family_named(source["family"])
    else:  # a model trained here: the plainest family that carries its tensors
        family = family_named("qwen3" if m.qk_head_norm else "qwen2" if m.qkv_bias else "llama")
    flags = rope_flags(m.phase, m.num_layers, m.rope_layers)
    if not all(flags) and m.qk_head_norm:  # checked first: --arch nope, the fix below, cannot take them
        raise ConfigError(f"the model is in phase {m.phase!r} with per-head q/k norms (Qwen3), which no stock "
                          "transformers architecture has without RoPE; serve it from the Megatron checkpoint")
    if arch == "source" and not all(flags) and not family.per_layer_nope:
        raise ConfigError(f"the model is in phase {m.phase!r}, which {family.architecture} cannot express (it "
                          "always applies RoPE): export with --arch nope")
    if arch == "nope":
        if m.qk_head_norm:
            raise ConfigError("per-head q/k norms (Qwen3) have no stock NoPE architecture in transformers; "
                              "refusing rather than exporting a different function")
        family = NOPE_EXPORT
    kwargs: dict[str, Any] = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.groups, head_dim=m.head_dim, rms_norm_eps=m.norm_epsilon, hidden_act="silu",
        tie_word_embeddings=m.tie_embeddings, max_position_embeddings=m.seq_length, **_hf_rope_kwargs(m))
    # Token ids: the source model's, else its tokenizer's; none at all rather than another family's
    # defaults (SmolLM3's 128k ids would not even fit a small vocabulary).
    hf, own = (source["hf_config"] if source else {}), token_ids or {}
    kwargs.update({k: own.get(k) if hf.get(k) is None else hf[k] for k in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id")})
    if "max_position_embeddings" in hf and m.seq_length == _trained_length(
            _rope_scaling(rope_parameters(SimpleNamespace(**hf)), hf["max_position_embeddings"]),
            hf["max_position_embeddings"]):
        # The source's reach (a scaled model's is past its training context), unless training changed that context.
        kwargs["max_position_embeddings"] = hf["max_position_embeddings"]
    if m.qkv_bias and not family.qkv_bias:
        if family.name == "mistral":
            raise ConfigError("MistralForCausalLM has no attention biases; refusing to drop the model's q/k/v biases")
        kwargs["attention_bias"] = True  # q, k, v and o in these families: o's bias is written as zeros
    if family.per_layer_nope:
        kwargs.update(no_rope_layers=[int(f) for f in flags], use_sliding_window=False, sliding_window=None)
    elif family.sliding_window:
        kwargs.update(sliding_window=None, use_sliding_window=False)
    model_type = family.model_types[0]
    cfg = CONFIG_MAPPING[model_type](**kwargs)
    cfg.architectures = [family.architecture]
    cfg.dtype = dtypes.name_of(dtype)
    return cfg, family


def source_record(cfg, family: Family) -> dict[str, Any]:
    """What the checkpoint metadata keeps about its Hugging Face origin."""
    return {"family": family.name, "architecture": family.architecture, "hf_config": cfg.to_dict()}
