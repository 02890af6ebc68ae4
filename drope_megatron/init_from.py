"""A recipe's model section resolved against the checkpoint its run starts from (`train.init_from`).

Such a run builds the checkpoint's architecture. The recipe sets what applies on top of it: the
training context (`seq_length`, when the recipe writes it), the phase and its RoPE layers, the
QK-norm variant (which adds norms) and the options that change no weights. Any other model key
the recipe writes must agree with the checkpoint: a run never ignores it silently. The resolved
model is what `drope config` prints and what the run trains, so that output feeds back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from drope_megatron.config import ConfigError, ModelConfig, model_config_from_dict

APPLIED = frozenset({"seq_length", "phase", "rope_layers", "qk_norm", "softmax_scale", "attention_temperature",
                     "fused_kernels", "attention_backend"})
# The checkpoint decides these whatever a recipe writes: the dtype (the DeepSpeed config decides the
# training dtype), and what matters only before weights exist (initialisation, the vocab padding rule).
NO_EFFECT = frozenset({"params_dtype", "init_method_std", "make_vocab_size_divisible_by"})
# Keys whose unset value means a derived one: compared through it (attribute, words for the message).
_DERIVED = {"num_query_groups": ("groups", "query groups"), "kv_channels": ("head_dim", "head_dim"),
            "ffn_hidden_size": ("ffn_size", "FFN size")}


def resolve(model: ModelConfig, given: dict[str, Any], init_from: str | Path,
            stored: ModelConfig | None = None) -> ModelConfig:
    """The model a run from `init_from` trains, from the recipe's resolved `model` and its model
    section as written (`given`); `model` itself until that checkpoint exists, unless its model is
    known already (`stored`: the demo's shipped model, before it is converted there)."""
    from drope_megatron import checkpoint

    if stored is None:
        if not checkpoint.is_checkpoint(init_from):
            return model
        stored = checkpoint.model_config(init_from)
    _refuse_disagreement(stored, given, init_from)
    resolved = dataclasses.replace(
        stored, seq_length=model.seq_length if "seq_length" in given else stored.seq_length,
        phase=model.phase, rope_layers=(model.rope_layers or stored.rope_layers) if model.phase == "layers" else None,
        qk_norm=model.qk_norm or stored.qk_norm,
        softmax_scale=stored.softmax_scale if model.softmax_scale is None else model.softmax_scale,
        attention_temperature=model.attention_temperature if model.attention_temperature != "none"
        else stored.attention_temperature,
        fused_kernels=model.fused_kernels, attention_backend=model.attention_backend)
    if "attention_temperature" not in given and stored.attention_temperature != "none" \
            and resolved.attention_backend != "sdpa":
        # Named here: validation's message would name a key this recipe does not write.
        raise ConfigError(f"model.attention_backend={resolved.attention_backend}, but {init_from} uses "
                          f"attention_temperature={stored.attention_temperature}, which needs attention_backend=sdpa: "
                          "drop the key")
    return resolved


def _refuse_disagreement(stored: ModelConfig, given: dict[str, Any], init_from: str | Path) -> None:
    fix = "a run from train.init_from builds that checkpoint's architecture: drop the key or start from another"
    given = {k: v for k, v in given.items() if not (v is None and k in ("padded_vocab_size", "rope_scaling"))}
    nested = {**dataclasses.asdict(stored), **given,  # null padding: "derived from TP"; a checkpoint's is fixed
              "rope_scaling": {**dataclasses.asdict(stored.rope_scaling), **given.get("rope_scaling", {})}}
    asked = model_config_from_dict(nested)
    for key in sorted(set(given) - APPLIED - NO_EFFECT):
        if key == "rope_scaling":
            _refuse_scaling(stored.rope_scaling, asked.rope_scaling, given[key], init_from, fix)
            continue
        attr, words = _DERIVED.get(key, (key, None))
        ours, theirs = getattr(asked, attr), getattr(stored, attr)
        if ours != theirs:
            meaning = f" gives {ours} {words}," if words and given[key] is None else ","
            raise ConfigError(f"model.{key}={_yaml(given[key])}{meaning} but {init_from} has "
                              f"{_yaml(theirs)}{' ' + words if words else ''}: {fix}")
    if given.get("qk_norm") is False and stored.qk_norm:
        raise ConfigError(f"model.qk_norm=false, but {init_from} has the QK-norm weights: drop the key (they stay)")
    for key, unset in (("softmax_scale", None), ("attention_temperature", "none")):
        if key in given and given[key] == unset and getattr(stored, key) != unset:
            raise ConfigError(f"model.{key}={_yaml(unset)}, but {init_from} uses {getattr(stored, key)}, which a run "
                              "from it keeps: drop the key or set another value")


def _refuse_scaling(stored, asked, given: dict[str, Any], init_from: str | Path, fix: str) -> None:
    """The type first: a sub-key means something only under the type that reads it."""
    for sub in sorted(given, key=lambda k: k != "type"):
        theirs = getattr(stored, sub)
        if getattr(asked, sub) == theirs:
            continue
        if sub != "type" and sub not in stored.reads():
            raise ConfigError(f"model.rope_scaling.{sub}={_yaml(given[sub])} has no effect: {init_from} has RoPE "
                              f"scaling {stored.type}, which does not read it: drop the key")
        raise ConfigError(f"model.rope_scaling.{sub}={_yaml(given[sub])}, but {init_from} has {_yaml(theirs)}: {fix}")


def _yaml(value: Any) -> Any:
    """A value as a recipe writes it (null, true)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else value
