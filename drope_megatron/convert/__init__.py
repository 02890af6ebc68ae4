"""Conversion between Hugging Face folders and the project's Megatron checkpoints.

`families` declares the supported architectures as data, `tensors` the name map and the
QKV / gated-MLP / vocabulary-padding transforms, `hf_config` the configs both ways,
`safetensors_io` streaming reads and sharded writes, `read_ahead` the overlap of a
conversion's reads with its writes; `hf_to_megatron`, `megatron_to_hf` and `verify` are the
three commands.
"""
