"""Training data: tokenizers, document sources (HF datasets, Megatron indexed), EOS packing,
and the deterministic, resumable, data-parallel batch sampler."""
