"""Where a training step's time goes: our model's forward + backward + AdamW, fused kernels on vs off.

A bare loop (no DeepSpeed, no data pipeline), so it separates the model's own speed from the
loop's: compare its tokens/s with `train_throughput.py`'s. Prints the step time with megatron's
fused kernels on and off (they exist only on CUDA; on a CPU both runs take the same path) and,
with `--table`, the torch profiler's largest kernels. Ratio prints last.

    python benchmarks/step_profile.py --table            # GPU shape on CUDA, the CPU shape otherwise
    python benchmarks/step_profile.py --phase rope --micro 16
    python benchmarks/step_profile.py --compile          # also with compiled layers (train.compile_layers)
    python benchmarks/step_profile.py --quick            # a tiny model (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The shapes of train_throughput.py (micro batch from the command line).
CPU = dict(num_layers=6, hidden_size=320, num_attention_heads=5, ffn_hidden_size=896, vocab_size=8192,
           seq_length=256, params_dtype="float32")
GPU = dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816, vocab_size=32000,
           seq_length=2048, params_dtype="bfloat16")
QUICK = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, vocab_size=256,
             seq_length=32, params_dtype="float32")


def step_time(shape: dict, phase: str, micro: int, fused: bool, steps: int, table: bool,
              compiled: bool = False) -> float:
    """Seconds per step after 3 warm-up steps (which pay any compile); prints the profiler's kernel
    table when asked."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from drope_megatron.config import ModelConfig, ParallelConfig
    from drope_megatron.model import build_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    m = ModelConfig(**shape, make_vocab_size_divisible_by=1, tie_embeddings=False, phase=phase,
                    fused_kernels=fused)
    model = build_model(m, ParallelConfig()).to(device, getattr(torch, shape["params_dtype"]))  # norms too
    if compiled:
        model.compile_layers()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    seq = shape["seq_length"]
    tokens = torch.randint(0, shape["vocab_size"], (micro, seq + 1), device=device)
    positions = torch.arange(seq, device=device).expand(micro, seq)

    def step():
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    timed(3)
    seconds = timed(steps)
    if table:
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            timed(2)
        key = "cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=60))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phase", default="drope", choices=["drope", "rope"])
    parser.add_argument("--micro", type=int, default=None, help="sequences per step (default: 8 GPU, 4 CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (quick: 2)")
    parser.add_argument("--table", action="store_true", help="print the profiler's largest kernels (fused run)")
    parser.add_argument("--compile", action="store_true", help="also time the fused model with compiled layers")
    args = parser.parse_args()
    import torch

    from drope_megatron import distributed

    cuda = torch.cuda.is_available()
    shape = QUICK if args.quick else GPU if cuda else CPU
    micro = args.micro or (2 if args.quick else 8 if cuda else 4)
    steps = 2 if args.quick else args.steps
    variants = {"fused": (True, False), "plain": (False, False), **({"compiled": (True, True)} if args.compile else {})}
    with distributed.session(single=True):
        times = {name: step_time(shape, args.phase, micro, fused, steps, args.table and name == "fused", compiled)
                 for name, (fused, compiled) in variants.items()}
    tokens = micro * shape["seq_length"]
    for name, seconds in times.items():
        print(f"{name}: {1000 * seconds:.1f} ms per step, {tokens / seconds:.0f} tokens/s "
              f"({args.phase}, micro batch {micro}, seq {shape['seq_length']}, {shape['params_dtype']})")
    if "compiled" in times:
        print(f"ratio compiled / fused: {times['fused'] / times['compiled']:.2f}x")
    print(f"ratio fused / plain kernels: {times['plain'] / times['fused']:.2f}x"
          + ("" if cuda else " (no CUDA: both runs are unfused)"))


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
