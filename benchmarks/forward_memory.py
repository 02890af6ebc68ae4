"""Forward time and peak memory of a ~10M-parameter model: SDPA core attention vs megatron's.

Each (backend, length) runs in a fresh process so peaks do not mix; memory is the rise of the
process's peak RSS (reset once the model is built) over its RSS just before the forward pass.
Prints a table, then the ratios (megatron / SDPA) last.

    python benchmarks/forward_memory.py            # SDPA at 1k, 4k, 16k tokens; megatron at 1k, 4k
    python benchmarks/forward_memory.py --quick    # 64 and 256 tokens, a tiny model (CI)

Megatron's attention is left out at 16k: its [heads, 16k, 16k] fp32 scores and their softmax
copy alone would be about 10 GiB. Achieved GFLOP/s counts 2N per token for the matmuls plus
the causal attention (2 x 2 x layers x L^2 x hidden / 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import children

# A CPU benchmark (RSS, gloo, CPU threads): on a GPU host its children would otherwise take the GPU's
# paths (nccl, bf16, CUDA masks) half-way, with the model on the CPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# The DroPE model (no RoPE), the one evaluated far past its training length.
FULL = ["model.num_layers=6", "model.hidden_size=320", "model.num_attention_heads=5", "model.vocab_size=8192",
        "model.seq_length=256", "model.phase=drope"]
QUICK = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=512",
         "model.seq_length=64", "model.make_vocab_size_divisible_by=64", "model.phase=drope"]


def measure(backend: str, length: int, repeats: int, overrides: list[str]) -> dict:
    """Runs in the child: build, warm up at a short length, then time `repeats` forwards."""
    import psutil
    import torch

    from drope_megatron import distributed
    from drope_megatron.config import load_recipe
    from drope_megatron.model import build_model

    recipe = load_recipe(None, [*overrides, f"model.attention_backend={backend}"])
    with distributed.session(recipe.parallel, single=True), torch.no_grad():
        model = build_model(recipe.model, recipe.parallel).eval()
        params = sum(p.numel() for p in model.parameters())
        tokens = torch.randint(0, recipe.model.vocab_size, (1, length))
        positions = torch.arange(length).unsqueeze(0)
        model(tokens[:, :16], positions[:, :16], None)
        before = psutil.Process().memory_info().rss
        reset_peak()  # the build's transient peak is not the forward's
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens, positions, None)
            times.append(time.perf_counter() - start)
        peak = peak_rss()
    return {"backend": backend, "length": length, "params": params, "seconds": min(times),
            "peak_rise_mib": max(0, peak - before) / 2**20, "threads": torch.get_num_threads()}


def reset_peak() -> None:
    """Start this process's peak RSS (VmHWM) afresh (Linux); elsewhere the lifetime peak stays."""
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")


def peak_rss() -> int:
    """Bytes: VmHWM since `reset_peak` where Linux has it, else the lifetime peak."""
    status = Path("/proc/self/status")
    if status.exists():
        hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
        if hwm:
            return int(hwm[0].split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def forward_flops(params: int, length: int, overrides: list[str]) -> float:
    """2 FLOPs per parameter per token (the embedding is tied: its one matrix is the output layer's
    matmul) plus causal attention."""
    shape = {k.split("=")[0].split(".")[1]: k.split("=")[1] for k in overrides}
    layers, hidden = int(shape["num_layers"]), int(shape["hidden_size"])
    return 2 * params * length + 2 * layers * length**2 * hidden


def run_child(backend: str, length: int, repeats: int, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, str(length), str(repeats)] + (["--quick"] if quick else [])
    out = children.run(cmd)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (for CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "LENGTH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = QUICK if args.quick else FULL
    if args.child:
        backend, length, repeats = args.child
        print(json.dumps(measure(backend, int(length), int(repeats), overrides)))
        return
    lengths = [64, 256] if args.quick else [1024, 4096, 16384]
    megatron_max = 256 if args.quick else 4096
    rows = {(b, n): run_child(b, n, args.repeats, args.quick) for n in lengths for b in ("sdpa", "megatron")
            if b == "sdpa" or n <= megatron_max}
    first = next(iter(rows.values()))
    print(f"model: {first['params'] / 1e6:.1f}M params, batch 1, fp32, {first['threads']} threads, "
          f"best of {args.repeats}")
    print(f"{'backend':>9} {'tokens':>7} {'forward s':>10} {'peak rise MiB':>14} {'GFLOP/s':>8}")
    for (backend, n), r in rows.items():
        flops = forward_flops(r["params"], n, overrides)
        print(f"{backend:>9} {n:>7} {r['seconds']:>10.4f} {r['peak_rise_mib']:>14.1f} {flops / r['seconds'] / 1e9:>8.2f}")
    for short, long in zip(lengths, lengths[1:]):
        a, b = rows[("sdpa", short)], rows[("sdpa", long)]
        print(f"ratio sdpa {long}/{short} tokens ({long // short}x longer): time {b['seconds'] / a['seconds']:.2f}x, "
              f"peak memory rise {b['peak_rise_mib'] / max(a['peak_rise_mib'], 1.0):.2f}x")
    for n in lengths:
        if ("megatron", n) not in rows:
            continue
        sdpa, meg = rows[("sdpa", n)], rows[("megatron", n)]
        mem = meg["peak_rise_mib"] / max(sdpa["peak_rise_mib"], 1.0)
        print(f"ratio megatron/sdpa at {n} tokens: time {meg['seconds'] / sdpa['seconds']:.2f}x, "
              f"peak memory rise {mem:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
