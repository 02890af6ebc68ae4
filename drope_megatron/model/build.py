"""Build a `DropeGPTModel` from a `ModelConfig`: the TransformerConfig, the layer spec, the model.

The spec is megatron-core's local GPT spec with two rooms swapped by composition: self
attention becomes `DropeSelfAttention` (per-layer RoPE switch), core attention becomes
`SDPAttention` unless `attention_backend=megatron`, and the q/k norms become the paper's
full-width RMSNorm (`qk_norm`) or per-head norms whose gradient is summed over TP (`qk_head_norm`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from drope_megatron import compat, dtypes
from drope_megatron.config import ModelConfig, ParallelConfig
from drope_megatron.model.attention import DropeSelfAttention, SDPAttention
from drope_megatron.model.gpt import DropeGPTModel
from drope_megatron.model.qk_norm import FullWidthRMSNorm, HeadRMSNorm

def transformer_config(m: ModelConfig, p: ParallelConfig) -> TransformerConfig:
    dtype = dtypes.to_torch(m.params_dtype)
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.groups, ffn_hidden_size=m.ffn_size, kv_channels=m.head_dim,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        softmax_scale=m.softmax_scale,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
        # Initialise full weights on the CPU, then shard: the same seed gives the same model at any TP
        # whose padded vocabulary is the same (a larger padding draws more, shifting later weights).
        use_cpu_initialization=True, **compat.kernel_fusions(m.fused_kernels, dtype),
    )
    return config


def layer_spec(m: ModelConfig) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=m.qk_head_norm)
    attn = spec.submodules.self_attention
    sub = dataclasses.replace(attn.submodules)
    if m.attention_backend == "sdpa":
        # Attention calls core_attention(...) directly, not via build_module: bind our options here.
        sub.core_attention = functools.partial(
            SDPAttention, temperature=m.attention_temperature, train_length=m.seq_length)
    if m.qk_head_norm:
        sub.q_layernorm = sub.k_layernorm = ModuleSpec(module=HeadRMSNorm)
    if m.qk_norm:
        sub.q_layernorm = ModuleSpec(module=FullWidthRMSNorm, params={"num_heads": m.num_attention_heads})
        sub.k_layernorm = ModuleSpec(module=FullWidthRMSNorm, params={"num_heads": m.groups})
    spec.submodules.self_attention = ModuleSpec(module=DropeSelfAttention, params=attn.params, submodules=sub)
    return spec


def block_spec(m: ModelConfig, config: TransformerConfig) -> TransformerBlockSubmodules:
    """This stage's layers and a final norm of the layers' own kind. For a bare layer spec megatron
    picks the final norm by what imports: Transformer Engine's, or Apex's fused LayerNorm, which
    refuses RMSNorm (a crash on containers with Apex and no Transformer Engine)."""
    spec = layer_spec(m)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=spec.submodules.input_layernorm)


def build_model(m: ModelConfig, p: ParallelConfig, initialize: bool = True,
                gather_logits: bool = False) -> DropeGPTModel:
    """The model for this rank (its TP shard and PP stage), in `m.phase`.

    Needs megatron's parallel state (`distributed.initialize`): the stage decides whether this
    rank holds the embedding (first stage) and the output layer and loss (last stage).
    `initialize=False` skips random init (weights about to be loaded); `gather_logits` returns
    full-vocabulary logits on every TP rank instead of each rank's slice.
    """
    config = transformer_config(m, p)
    config.perform_initialization = initialize
    model = DropeGPTModel(
        config=config,
        transformer_layer_spec=block_spec(m, config),
        vocab_size=m.padded_vocab(p.tensor_model_parallel_size),
        max_sequence_length=m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=m.tie_embeddings,
        parallel_output=not gather_logits,
        rotary_base=m.rotary_base,
        rope_scaling=m.rope_scaling,
        phase=m.phase,
        rope_layers=m.rope_layers,
    )
    if not initialize:
        _mark_split_weights(model)
    return model


def _mark_split_weights(model: DropeGPTModel) -> None:
    """megatron-core marks a split weight tensor-parallel only while it initialises it at random.
    A model built to be loaded needs the marks too: DeepSpeed's gradient norm (clipping, the logged
    value) counts an unmarked weight on TP rank 0 only, as if every rank held the same copy."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding, RowParallelLinear)):
            dim = 1 if isinstance(module, RowParallelLinear) else 0
            # SwiGLU's fc1 holds interleaved [gate, up] parts per rank, as megatron's MLP says (stride 2).
            stride = 2 if name.endswith("linear_fc1") and model.config.gated_linear_unit else 1
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=stride)
