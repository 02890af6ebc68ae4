"""Training data: tokenizers, document sources (HF datasets, Megatron indexed), EOS packing,
the deterministic, resumable, data-parallel batch sampler, the Megatron indexed-dataset writer
(indexed.py) and the offline demo corpus (corpus.py)."""
