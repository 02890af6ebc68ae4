"""Resuming the training data stream: rebuilt from a checkpoint's saved state vs replayed from the start.

The stream at block `position` of the demo corpus (json documents tokenised on the fly with the
shipped sentencepiece model, as `data.format=json` trains): how long a resumed run waits before its
first batch either way. Before data states were saved, every resume replayed.

    python benchmarks/data_resume.py            # 20,000 blocks of 257 tokens (5.1M tokens)
    python benchmarks/data_resume.py --quick    # 200 blocks (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from drope_megatron.config import DataConfig
    from drope_megatron.data import corpus
    from drope_megatron.data.documents import documents
    from drope_megatron.data.packing import BatchStream, block_stream
    from drope_megatron.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".build" / "bench-resume")
    args = parser.parse_args()
    position = 200 if args.quick else 20_000
    folder = corpus.build_corpus(args.workdir / ("corpus-quick" if args.quick else "corpus"),
                                 max_chars=500_000 if args.quick else None)  # reused when already built
    tok = load_tokenizer(folder / "tokenizer.model")
    d = DataConfig(paths=[str(folder / "train.jsonl")], format="json")

    def stream(state=None, replay=False):
        blocks = block_stream(lambda epoch, start: documents(d, tok, epoch, 0, start), 257, 1024, 0, state)
        return BatchStream(blocks, 8, 0, 1, position, replay=replay)

    run = BatchStream(block_stream(lambda epoch, start: documents(d, tok, epoch, 0, start), 257, 1024, 0), 8, 0, 1)
    while run.position < position:
        run.next_micro_batch()
    state, expected = run.state(), run.next_micro_batch()
    timings = {}
    for name, make in (("replayed", lambda: stream(replay=True)), ("from saved state", lambda: stream(state))):
        start = time.perf_counter()
        batch = make().next_micro_batch()
        timings[name] = time.perf_counter() - start
        assert (batch == expected).all(), name
    tokens = position * 257
    for name, seconds in timings.items():
        print(f"{name:>17}: first batch after {seconds:.2f} s")
    print(f"ratio: resuming at block {position} ({tokens / 1e6:.1f}M tokens) waits "
          f"{timings['replayed'] / timings['from saved state']:.0f}x less from the saved state")


if __name__ == "__main__":
    main()
