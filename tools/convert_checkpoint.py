#!/usr/bin/env python
"""Conversion for scripts that do not use the `drope` command: same arguments as `drope convert`.

    python tools/convert_checkpoint.py hf-to-megatron HF_DIR MEG_DIR --tp 2
    python tools/convert_checkpoint.py megatron-to-hf MEG_DIR HF_OUT --arch nope
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py verify HF_DIR MEG_DIR --tp 2
"""

import sys

from drope_megatron.cli import run

if __name__ == "__main__":
    run(["convert", *sys.argv[1:]])
