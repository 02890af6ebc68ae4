"""Recalibration throughput and per-rank memory of a ~10M-parameter model for ZeRO 0/1/2/3
on two data-parallel processes, against one process (ZeRO 0) measured in the same run.

    python benchmarks/zero_throughput.py            # 10.2M params, seq 256, 24 steps per config
    python benchmarks/zero_throughput.py --quick    # a tiny model, 4 steps (CI)

Tokens/s is the median over steps after the first two; memory is each rank's peak RSS
(imports included: at this size they dominate, so also read params/optimizer elements per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = ["model.num_layers=6", "model.hidden_size=320", "model.num_attention_heads=5", "model.vocab_size=8192",
        "model.seq_length=256", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=24"]
QUICK = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=256",
         "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=4"]


def corpus(folder: Path) -> list[str]:
    from tests.train import corpus as corpus_lib

    built = corpus_lib.build(folder, docs=8, lines=400)
    return corpus_lib.data_args(built)


def run(nproc: int, stage: int, args: list[str], work: Path) -> dict:
    run_dir = work / f"z{stage}-n{nproc}"
    cli = ["-m", "drope_megatron.cli", "pretrain", *args, f"train.zero_stage={stage}", f"train.save_dir={run_dir}",
           "train.log_interval=1", "train.save_interval=0", "--quiet"]
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29731"] if nproc > 1 else []
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL,"
             " stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, *launcher, *cli], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:] or rows),
            "peak_rss_gib": int(out.split()[-1]) / 2**20, "params_local": rows[0]["params_local"],
            "optimizer_local": rows[0]["optimizer_state_local"], "params_total": rows[0]["params_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = (QUICK if args.quick else FULL) + corpus(work / "corpus")
        results = {"1 proc, ZeRO 0": run(1, 0, common, work)}
        for stage in (0, 1, 2, 3):
            results[f"2 procs, ZeRO {stage}"] = run(2, stage, common, work)
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
