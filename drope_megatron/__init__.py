"""drope_megatron: DroPE (drop RoPE, recalibrate, extend context) on megatron-core and DeepSpeed.

Rooms: `config` (typed recipes), `typed_yaml` (dataclasses from YAML and dotted overrides),
`init_from` (a recipe's model over the checkpoint it starts from), `distributed` (launchers,
process groups), `compat` (megatron-core CPU shims), `model/` (the GPT model with a switchable
positional phase), `checkpoint` (the Megatron checkpoint format), `convert/` (Hugging Face <-> Megatron),
`data/` (tokenizers, packing), `train/` (the DeepSpeed loop), `eval/` (long-context evaluation),
`demo/` (the embedded CPU demo), `cli` (the `drope` command).
"""

__version__ = "0.1.0"
