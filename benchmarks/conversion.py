"""Conversion cost against its floors: HF -> Megatron -> HF of a ~1B-parameter-shaped random
checkpoint, timed against a plain copy of the same bytes, peak RSS against the checkpoint size.

Two copies bound the time from below: `cp` (in-kernel, done once the bytes are in the page cache)
and `cp` + `sync` (the bytes on disk). Both directions publish their folder only once its bytes
are on disk (fsync, then rename), so each is compared with the durable copy; the ratio to the
page-cache copy is printed too. Every step starts after a `sync`, so none pays for an earlier
step's writeback.

    python benchmarks/conversion.py            # 1.1B params, bf16 (2.2 GB), in .build/bench-conversion
    python benchmarks/conversion.py --quick    # a tiny model (CI)
    python benchmarks/conversion.py --layers 32   # twice as deep (2.1B, 4.1 GB): memory stays

Each step runs in its own process; its peak RSS is the largest of that process and those it starts
(megatron-core's forked writers), each counted alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import children

ROOT = children.ROOT
sys.path.insert(0, str(ROOT))
MARKER = ".made-by-conversion-benchmark"

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
QUICK = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=256)


def generate(folder: Path, shape: dict) -> int:
    """Write a random bf16 Llama checkpoint tensor by tensor (never the whole model in memory)."""
    import torch
    from transformers import LlamaConfig

    from drope_megatron.convert.safetensors_io import ShardedWriter

    cfg = LlamaConfig(**shape, dtype="bfloat16")
    folder.mkdir(parents=True)
    h = cfg.hidden_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, cfg.intermediate_size)})
    gen = torch.Generator().manual_seed(0)
    plan = [(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    with ShardedWriter(folder, plan, max_bytes=512 * 2**20) as writer:
        for name, shape in shapes.items():
            writer.add(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    cfg.save_pretrained(str(folder))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measured(cmd: list[str]) -> dict:
    """One step in its own process: wall time and the peak RSS of its largest process."""
    os.sync()  # earlier steps' dirty pages are not this step's cost
    return children.measured(cmd)


def fresh_workdir(work: Path) -> None:
    """Empty `work` for this run; a folder holding anything this script did not make is refused."""
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        sys.exit(f"--workdir {work} holds files this benchmark did not make: name a new or empty folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="tiny model (CI)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".build" / "bench-conversion",
                        help="scratch folder (new or made by this script; its checkpoints are kept)")
    parser.add_argument("--layers", type=int, help="another depth, same layer shape: memory should not follow it")
    args = parser.parse_args()
    work = args.workdir
    fresh_workdir(work)
    shape = dict(QUICK if args.quick else FULL)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    size = generate(work / "hf", shape)
    drope = [sys.executable, "-m", "drope_megatron.cli", "convert"]
    imports = ("import transformers, megatron.core.dist_checkpointing; "
               "import drope_megatron.convert.hf_to_megatron, drope_megatron.distributed")
    # As `drope convert` imports them: without TorchInductor's compiler (see cli.cmd_convert). Timed
    # three times between the steps, the fastest kept: the first run alone sees the coldest caches.
    only_imports = ["env", "TORCHDYNAMO_DISABLE=1", "CUDA_VISIBLE_DEVICES=", sys.executable, "-c", imports]
    runs = [measured(only_imports)]
    steps = {
        "copy (page cache)": measured(["cp", "-r", str(work / "hf"), str(work / "copy")]),
        "copy + sync (disk)": measured(["sh", "-c", f"cp -r {work / 'hf'} {work / 'copy2'} && sync -f {work / 'copy2'}"]),
        "hf -> megatron": measured([*drope, "hf-to-megatron", str(work / "hf"), str(work / "meg"), "--quiet"]),
    }
    runs.append(measured(only_imports))
    steps["megatron -> hf"] = measured([*drope, "megatron-to-hf", str(work / "meg"), str(work / "out"), "--quiet"])
    runs.append(measured(only_imports))
    # Tensors stream into their shard: many small shards should take the memory of one big one
    # (64 MiB shards; half a MiB in --quick, so that its tiny model is written in several too).
    steps["megatron -> hf 64M"] = measured([*drope, "megatron-to-hf", str(work / "meg"), str(work / "out64"),
                                             "--max-shard-gib", "0.0005" if args.quick else "0.0625", "--quiet"])
    steps = {"imports only": min(runs, key=lambda r: r["seconds"]), **steps}
    from drope_megatron import atomic

    atomic.write_json(work / "results.json", {"bytes": size, "steps": steps})
    for copy in ("copy", "copy2", "out64"):
        shutil.rmtree(work / copy, ignore_errors=True)
    print(f"kept in {work}: the checkpoints hf/, meg/ and out/ ({3 * size / 2**30:.1f} GiB), results.json")
    report(steps, size)


def report(steps: dict, size: int) -> None:
    print(f"checkpoint: {size / 2 / 1e9:.2f}B params, bf16, {size / 2**30:.2f} GiB of safetensors")
    print(f"{'step':>19} {'seconds':>9} {'peak RSS GiB':>13}")
    for name, r in steps.items():
        print(f"{name:>19} {r['seconds']:>9.2f} {r['peak_rss_gib']:>13.2f}")
    imports, durable = steps["imports only"], steps["copy + sync (disk)"]["seconds"]  # the best of 3
    for name in ("hf -> megatron", "megatron -> hf", "megatron -> hf 64M"):
        r = steps[name]
        print(f"ratio {name}: time {r['seconds'] / durable:.1f}x the durable copy "
              f"({r['seconds'] / steps['copy (page cache)']['seconds']:.1f}x the page-cache copy; "
              f"{(r['seconds'] - imports['seconds']) / durable:.1f}x above the imports' {imports['seconds']:.1f} s), "
              f"peak RSS {r['peak_rss_gib'] * 2**30 / size:.2f}x the checkpoint size "
              f"({(r['peak_rss_gib'] - imports['peak_rss_gib']) * 2**30 / size:.2f}x above the imports' "
              f"{imports['peak_rss_gib']:.2f} GiB)")

if __name__ == "__main__":
    main()
