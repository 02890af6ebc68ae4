"""Recalibration throughput against the reference stack, and against the machine's matmul peak.

Two phases. Recalibration (drope): `drope recalibrate`, the megatron-core model without RoPE in
our DeepSpeed loop, against transformers' stock NoPE Llama (`SmolLM3ForCausalLM` with RoPE off in
every layer) in a plain DeepSpeed loop. Pretraining (rope): `drope pretrain` against
`LlamaForCausalLM`. Same batch, sequence, dtype (fp32 on CPU, bf16 on GPU), ZeRO stage, thread count and
random-token data; each run in its own process. Achieved FLOP/s (6N + attention per token) is
compared with a large matmul timed in the same run. Ratios print last.

    python benchmarks/train_throughput.py           # 13M params, seq 256, ZeRO 0 and 3, 24 steps
    python benchmarks/train_throughput.py --quick   # a tiny model, ZeRO 0 and 3, 4 steps (CI)
    (on a GPU the full mode uses the GPU shape below: 0.4B parameters, seq 2048, ZeRO 0 and 1, and
    also times our model without megatron's fused kernels, unless --no-plain)
    python benchmarks/train_throughput.py --compile # also ours with train.compile_layers=true
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import children

ROOT = children.ROOT
sys.path.insert(0, str(ROOT))

FULL = dict(layers=6, hidden=320, heads=5, ffn=896, vocab=8192, seq=256, micro=4, steps=24, stages=(0, 3))
# On a GPU (bf16): a 0.4B-parameter Llama shape at the paper's context, large enough to load the device.
GPU = dict(layers=24, hidden=1024, heads=16, ffn=2816, vocab=32000, seq=2048, micro=8, steps=20, stages=(0, 1))
QUICK = dict(layers=2, hidden=64, heads=4, ffn=192, vocab=256, seq=32, micro=2, steps=4, stages=(0, 3))
# Throughput is the mean over steps 2..N (the first step warms up), measured by each loop's own clock:
# ours from the wall times of its JSONL lines at steps 1 and N (logging only those, as a real run
# logs rarely), the reference around the same steps.


def ours(shape: dict, phase: str, stage: int, work: Path, params: int, fused: bool = True,
         compiled: bool = False) -> tuple[float, float]:
    """Tokens/s and last loss of `drope pretrain` / `recalibrate` on random tokens (Megatron indexed data);
    its model must have the reference's `params` (one FLOP count serves both)."""
    import numpy as np

    from drope_megatron.data.indexed import write_indexed

    data = work / "random"
    if not Path(f"{data}.bin").is_file():
        rng = np.random.default_rng(0)
        docs = max(64, shape["steps"] * shape["micro"] * shape["seq"] // 4096 + 8)
        write_indexed((rng.integers(0, shape["vocab"], 4096) for _ in range(docs)), data, shape["vocab"])
    run_dir = work / f"ours-{phase}-z{stage}-{'fused' if fused else 'plain'}{'-compiled' if compiled else ''}"
    args = [f"model.num_layers={shape['layers']}", f"model.hidden_size={shape['hidden']}",
            f"model.num_attention_heads={shape['heads']}", f"model.ffn_hidden_size={shape['ffn']}",
            f"model.vocab_size={shape['vocab']}", f"model.seq_length={shape['seq']}",
            "model.make_vocab_size_divisible_by=1", "model.tie_embeddings=false",
            f"train.micro_batch_size={shape['micro']}",
            f"train.global_batch_size={shape['micro']}", f"train.steps={shape['steps']}", f"train.zero_stage={stage}",
            f"train.log_interval={shape['steps']}", f"model.fused_kernels={str(fused).lower()}",
            f"train.compile_layers={str(compiled).lower()}",
            "data.format=megatron", f"data.paths=[{data}]", f"train.save_dir={run_dir}"]
    command = "pretrain" if phase == "rope" else "recalibrate"
    children.run([sys.executable, "-m", "drope_megatron.cli", command, *args, "--quiet"])
    first, last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if first["params_total"] != params:
        raise SystemExit(f"our model has {first['params_total']} parameters, the reference {params}: "
                         "not the same shape")
    shutil.rmtree(run_dir)  # its final save (with the optimizer's state: 6 GB at the GPU shape) is not needed
    rate = (last["step"] - first["step"]) * shape["micro"] * shape["seq"] / (last["time"] - first["time"])
    return rate, last["loss"]


def reference(shape: dict, phase: str, stage: int) -> dict:
    """In a child: the HF model in a plain DeepSpeed loop; tokens/s, params and the matmul peak."""
    out = children.run([sys.executable, __file__, "--child", json.dumps({**shape, "phase": phase, "stage": stage})])
    return json.loads(out.strip().splitlines()[-1])


def _child(spec: dict) -> dict:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    from drope_megatron.distributed import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    shape = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
                 num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                 num_key_value_heads=spec["heads"], max_position_embeddings=spec["seq"], tie_word_embeddings=False,
                 use_cache=False)  # a training forward would otherwise fill a KV cache in every layer
    if spec["phase"] == "rope":
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), attn_implementation="sdpa")
    else:  # transformers' own Llama-shaped model with RoPE switchable off per layer (0 = no RoPE)
        cfg = SmolLM3Config(**shape, no_rope_layers=[0] * spec["layers"], use_sliding_window=False,
                            pad_token_id=None)
        model = SmolLM3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    from drope_megatron.config import TrainConfig
    from drope_megatron.train.engine import deepspeed_config

    # The DeepSpeed JSON our loop runs: the same optimizer wrapper on both sides (at ZeRO >= 1 in
    # bf16 it accumulates gradients in fp32, which picks DeepSpeed's BF16_Optimizer at ZeRO 1).
    config = deepspeed_config(TrainConfig(global_batch_size=spec["micro"], micro_batch_size=spec["micro"],
                                          grad_clip=1.0, zero_stage=spec["stage"]), dp=1)
    # torch's fused AdamW on a GPU, as ours runs (and as transformers' Trainer defaults to there)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0,
                                  **({"fused": True} if torch.cuda.is_available() else {}))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(0)
    for step in range(spec["steps"]):
        if step == 1:
            start = time.perf_counter()
        batch = torch.randint(0, spec["vocab"], (spec["micro"], spec["seq"] + 1), generator=gen).to(engine.device)
        loss = engine(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # transformers shifts the labels
        engine.backward(loss)
        engine.step()
        loss.item()  # waits for the device, as our loop does for its loss each step
    rate = (spec["steps"] - 1) * spec["micro"] * spec["seq"] / (time.perf_counter() - start)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return {"tokens_per_s": rate, "params": params,
            "embedding": spec["vocab"] * spec["hidden"], "peak_flops": matmul_peak(),
            "threads": torch.get_num_threads()}


def matmul_peak() -> float:
    """Best FLOP/s of a large square matmul in the training dtype (the physical limit here), after
    a warm-up; the report takes the best over every process of the run."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    a @ a
    best = float("inf")
    for _ in range(10):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(shape: dict, params: int, embedding: int) -> float:
    """6 x (all matmul parameters: everything but the input embedding) + causal attention."""
    return 6 * (params - embedding) + 6 * shape["layers"] * shape["seq"] * shape["hidden"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", help="comma-separated ZeRO stages (default 0,3 on CPU and quick, 0,1 on GPU)")
    parser.add_argument("--phases", default="drope,rope", help="drope (recalibration), rope (pretraining)")
    parser.add_argument("--compile", action="store_true", help="also time ours with train.compile_layers=true")
    parser.add_argument("--no-plain", action="store_true",
                        help="on a GPU, skip timing ours without megatron's fused kernels")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    phases = args.phases.split(",")
    if not phases or set(phases) - {"drope", "rope"}:
        parser.error(f"--phases {args.phases!r}: use drope, rope or both, comma-separated")
    import torch

    shape = dict(QUICK if args.quick else GPU if torch.cuda.is_available() else FULL)
    if args.stages:
        shape["stages"] = tuple(int(x) for x in args.stages.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            for stage in shape["stages"]:
                row = {"phase": phase, "stage": stage, **reference(shape, phase, stage)}
                row["ours"], row["loss"] = ours(shape, phase, stage, Path(tmp), row["params"])
                if torch.cuda.is_available() and not args.no_plain:  # the fusions exist only there
                    row["plain"], row["plain_loss"] = ours(shape, phase, stage, Path(tmp), row["params"], fused=False)
                if args.compile:
                    row["compiled"], row["compiled_loss"] = ours(shape, phase, stage, Path(tmp), row["params"],
                                                                 compiled=True)
                rows.append(row)
    report(shape, rows)


def report(shape: dict, rows: list[dict]) -> None:
    per_token = flops_per_token(shape, rows[0]["params"], rows[0]["embedding"])
    peak = max(r["peak_flops"] for r in rows)  # one denominator for every row: a slow sample is noise
    for r in rows:
        r["peak_flops"] = peak
    print(f"model {rows[0]['params'] / 1e6:.2f}M params, seq {shape['seq']}, micro batch {shape['micro']}, "
          f"{rows[0]['threads']} threads, {per_token / 1e6:.1f} MFLOP/token, matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (best of {len(rows)} processes)")
    print(f"{'phase':>5} {'ZeRO':>4} {'ours tok/s':>11} {'reference tok/s':>16} {'ours % of peak':>15}")
    for r in rows:
        print(f"{r['phase']:>5} {r['stage']:>4} {r['ours']:>11.0f} {r['tokens_per_s']:>16.0f} "
              f"{100 * r['ours'] * per_token / r['peak_flops']:>14.1f}%")
    for r in (r for r in rows if "plain" in r):
        print(f"{r['phase']}, ZeRO {r['stage']}, without megatron's fused kernels: {r['plain']:.0f} tok/s; "
              f"fused / plain {r['ours'] / r['plain']:.2f}x; loss at step {shape['steps']}: "
              f"fused {r['loss']:.4f}, plain {r['plain_loss']:.4f}")
    for r in (r for r in rows if "compiled" in r):  # steps after the first: the compile is not counted
        print(f"{r['phase']}, ZeRO {r['stage']}, with compiled layers: {r['compiled']:.0f} tok/s "
              f"({100 * r['compiled'] * per_token / r['peak_flops']:.1f}% of the peak); compiled / not "
              f"{r['compiled'] / r['ours']:.2f}x; loss at step {shape['steps']}: compiled "
              f"{r['compiled_loss']:.4f}, not {r['loss']:.4f}")
    for r in rows:
        print(f"ratio ours / reference, {r['phase']}, ZeRO {r['stage']}: {r['ours'] / r['tokens_per_s']:.2f}x "
              f"(ours at {100 * r['ours'] * per_token / r['peak_flops']:.1f}% of the matmul peak, reference at "
              f"{100 * r['tokens_per_s'] * per_token / r['peak_flops']:.1f}%)")


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))
    main()
