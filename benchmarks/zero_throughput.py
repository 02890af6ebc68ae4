"""Recalibration throughput and per-rank memory of a ~10M-parameter model for ZeRO 0/1/2/3
on two data-parallel processes, against one process (ZeRO 0) measured in the same run.

    python benchmarks/zero_throughput.py            # 10.2M params, seq 256, 24 steps per config
    python benchmarks/zero_throughput.py --quick    # a tiny model, 4 steps (CI)

Tokens/s is measured by the loop's own clock from step 1 to the last; memory is the largest
process's peak RSS (imports and the final save included: at this size they dominate, so also read
the params/optimizer elements per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import children

ROOT = children.ROOT
sys.path.insert(0, str(ROOT))

FULL = dict(layers=6, hidden=320, heads=5, vocab=8192, seq=256, micro=4, batch=8, steps=24)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=256, seq=32, micro=2, batch=4, steps=4)


def corpus(folder: Path) -> list[str]:
    from tests.train import corpus as corpus_lib

    built = corpus_lib.build(folder, docs=8, lines=400)
    return corpus_lib.data_args(built)


def run(nproc: int, stage: int, shape: dict, data: list[str], work: Path) -> dict:
    """`drope recalibrate` at one ZeRO stage on `nproc` processes: tokens/s by the loop's own clock
    from step 1 to the last (only those two are logged, so no step pays for a logged step's extra
    gradient-norm pass), and the largest process's peak RSS (the final save included)."""
    from drope_megatron.distributed import free_port

    run_dir = work / f"z{stage}-n{nproc}"
    cli = ["-m", "drope_megatron.cli", "recalibrate", f"model.num_layers={shape['layers']}",
           f"model.hidden_size={shape['hidden']}", f"model.num_attention_heads={shape['heads']}",
           f"model.vocab_size={shape['vocab']}", f"model.seq_length={shape['seq']}",
           f"train.micro_batch_size={shape['micro']}", f"train.global_batch_size={shape['batch']}",
           f"train.steps={shape['steps']}", f"train.log_interval={shape['steps']}", *data,
           f"train.zero_stage={stage}", f"train.save_dir={run_dir}", "--quiet"]
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    peak = children.measured([sys.executable, *(launcher if nproc > 1 else []), *cli])
    first, last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rate = (last["step"] - first["step"]) * shape["batch"] * shape["seq"] / (last["time"] - first["time"])
    return {"tokens_per_s": rate, "peak_rss_gib": peak["peak_rss_gib"], "params_local": first["params_local"],
            "optimizer_local": first["optimizer_state_local"], "params_total": first["params_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape, data = QUICK if args.quick else FULL, corpus(work / "corpus")
        results = {"1 proc, ZeRO 0": run(1, 0, shape, data, work)}
        for stage in (0, 1, 2, 3):
            results[f"2 procs, ZeRO {stage}"] = run(2, stage, shape, data, work)
    base = results["1 proc, ZeRO 0"]
    print(f"model: {base['params_total'] / 1e6:.1f}M params; OMP threads 1 per rank; fp32, CPU, gloo")
    print(f"{'config':>16} {'tokens/s':>9} {'peak RSS GiB/rank':>18} {'params/rank':>12} {'optim elems/rank':>17}")
    for name, r in results.items():
        print(f"{name:>16} {r['tokens_per_s']:>9.0f} {r['peak_rss_gib']:>18.2f} {r['params_local']:>12} "
              f"{r['optimizer_local']:>17}")
    for name, r in results.items():
        if name != "1 proc, ZeRO 0":
            print(f"ratio {name} / 1 proc: tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}x, "
                  f"params per rank {r['params_local'] / base['params_local']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))
    main()
