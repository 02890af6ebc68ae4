"""Recalibration throughput and per-rank memory of a ~10M-parameter model for ZeRO 0/1/2/3
on two data-parallel processes (1 OMP thread each), against one process (ZeRO 0) with 1 thread
and with 2 (the same cores as the two processes), measured in the same run.

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

# A CPU benchmark (RSS, gloo, CPU threads): on a GPU host its children would otherwise take the GPU's
# paths (nccl, bf16, CUDA masks) half-way, with the model on the CPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = children.ROOT
sys.path.insert(0, str(ROOT))

FULL = dict(layers=6, hidden=320, heads=5, vocab=8192, seq=256, micro=4, batch=8, steps=24)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=256, seq=32, micro=2, batch=4, steps=4)
ONE_CORE, BOTH_CORES = "1 proc x 1 thread, ZeRO 0", "1 proc x 2 threads, ZeRO 0"


def corpus(folder: Path) -> list[str]:
    from tests.train import corpus as corpus_lib

    built = corpus_lib.build(folder, docs=8, lines=400)
    return corpus_lib.data_args(built)


def run(nproc: int, stage: int, shape: dict, data: list[str], work: Path, threads: int = 1) -> dict:
    """`drope recalibrate` at one ZeRO stage on `nproc` processes of `threads` OMP threads each:
    tokens/s by the loop's own clock from step 1 to the last (only those two are logged, so no step
    pays for a logged step's extra gradient-norm pass), and the largest process's peak RSS (the
    final save included)."""
    from drope_megatron.distributed import free_port

    run_dir = work / f"z{stage}-n{nproc}-t{threads}"
    cli = ["-m", "drope_megatron.cli", "recalibrate", f"model.num_layers={shape['layers']}",
           f"model.hidden_size={shape['hidden']}", f"model.num_attention_heads={shape['heads']}",
           f"model.vocab_size={shape['vocab']}", f"model.seq_length={shape['seq']}",
           f"train.micro_batch_size={shape['micro']}", f"train.global_batch_size={shape['batch']}",
           f"train.steps={shape['steps']}", f"train.log_interval={shape['steps']}", *data,
           f"train.zero_stage={stage}", f"train.save_dir={run_dir}", "--quiet"]
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    before = os.environ["OMP_NUM_THREADS"]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the child's, and its ranks'
    try:
        peak = children.measured([sys.executable, *(launcher if nproc > 1 else []), *cli])
    finally:
        os.environ["OMP_NUM_THREADS"] = before
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
        # Two baselines: one process on one core (what a second rank adds per core) and on both
        # cores (what data parallelism adds on the same machine: the fair one).
        results = {ONE_CORE: run(1, 0, shape, data, work), BOTH_CORES: run(1, 0, shape, data, work, threads=2)}
        for stage in (0, 1, 2, 3):
            results[f"2 procs x 1 thread, ZeRO {stage}"] = run(2, stage, shape, data, work)
    print(f"model: {results[ONE_CORE]['params_total'] / 1e6:.1f}M params; fp32, CPU, gloo")
    print(f"{'config':>30} {'tokens/s':>9} {'peak RSS GiB/rank':>18} {'params/rank':>12} {'optim elems/rank':>17}")
    for name, r in results.items():
        print(f"{name:>30} {r['tokens_per_s']:>9.0f} {r['peak_rss_gib']:>18.2f} {r['params_local']:>12} "
              f"{r['optimizer_local']:>17}")
    for name, r in results.items():
        if name.startswith("2 procs"):
            print(f"ratio {name}: tokens/s {r['tokens_per_s'] / results[BOTH_CORES]['tokens_per_s']:.2f}x "
                  f"1 proc on the same 2 cores ({r['tokens_per_s'] / results[ONE_CORE]['tokens_per_s']:.2f}x "
                  f"1 proc on 1), params per rank {r['params_local'] / results[ONE_CORE]['params_local']:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))
    main()
