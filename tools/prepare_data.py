#!/usr/bin/env python
"""Tokenise text/json/parquet files once into a Megatron indexed dataset (.bin/.idx) for training.

    python tools/prepare_data.py --input data/train.jsonl --tokenizer tok.model --out data/train
    # then: drope pretrain RECIPE data.format=megatron data.paths=[data/train]

Documents keep their file order (training shuffles them per epoch) and end with the tokenizer's EOS.
"""

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from drope_megatron import atomic
from drope_megatron.cli import quiet_library_warnings
from drope_megatron.config import ConfigError, DataConfig
from drope_megatron.data.documents import documents, file_format
from drope_megatron.data.indexed import write_indexed
from drope_megatron.data.tokenizer import load_tokenizer

# The data settings this tool fills from its flags, and so names by them in its errors.
FLAG_NAMES = {"data.paths": "--input", "data.tokenizer": "--tokenizer", "data.text_key": "--text-key"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="text, json/jsonl or parquet files (one kind)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder or sentencepiece .model")
    p.add_argument("--out", required=True, type=Path, help="output prefix: writes OUT.bin, OUT.idx, OUT.json")
    p.add_argument("--text-key", default="text", help="text column of json/parquet input")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.bin/.idx")
    args = p.parse_args(argv)
    quiet_library_warnings()
    start = time.perf_counter()
    try:
        for suffix in (".bin", ".idx"):
            atomic.refuse_existing(Path(f"{args.out}{suffix}"), args.overwrite)
        tok = load_tokenizer(args.tokenizer)
        d = DataConfig(paths=args.input, format=file_format(args.input), text_key=args.text_key, shuffle=False)
        docs = tqdm(documents(d, tok, epoch=0, seed=0), desc="tokenising", unit="doc", mininterval=2)
        info = write_indexed(docs, args.out, tok.vocab_size)
    except ConfigError as exc:
        print(f"prepare_data: error: {exc.renamed(FLAG_NAMES)}", file=sys.stderr)
        return 2
    print(f"{args.out}.bin/.idx: {info['documents']} documents, {info['tokens']:,} tokens ({info['dtype']}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
