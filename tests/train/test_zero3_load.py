"""ZeRO-3 and Megatron checkpoints: parameters arrive partitioned (about half per rank on two
ranks) in bf16, as a bf16 run builds them (megatron's fp32 norms included: before, their load
failed megatron's dtype check), and, gathered, equal an unpartitioned load in bf16; saved back
from the partitions, the checkpoint holds the same weights. RoPE's table stays fp32."""

import json

import torch

from tests.helpers import ROOT, tiny_recipe, torchrun


def test_checkpoint_round_trip_through_partitioned_model(megatron_world, tmp_path):
    from drope_megatron import checkpoint
    from drope_megatron.model import build_model

    recipe = tiny_recipe("model.qk_norm=true")  # the full-width q/k norms too, each moved off its initial 1
    model = build_model(recipe.model, recipe.parallel)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.linspace(0.5, 1.5, param.numel()).view_as(param))
    ckpt = checkpoint.save(model, recipe.model, tmp_path / "ckpt")
    out = tmp_path / "found.json"
    proc = torchrun(2, [str(ROOT / "tests" / "workers" / "zero3_load.py"), str(ckpt), str(out), "bfloat16"],
                    timeout=240, DS_ACCELERATOR="cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["max_abs_diff"] == 0.0 and found["world_size"] == 2
    assert found["rotary_equal"]  # zero.Init made its table bf16: RoPE at garbled angles
    assert 0.45 < found["local"] / found["total"] < 0.55, found
    # Saved back from the partitions (each rank writing half the parameters): the same weights.
    original, _ = checkpoint.load_model(ckpt, recipe.parallel)
    saved, _ = checkpoint.load_model(tmp_path / "saved", recipe.parallel)
    theirs = dict(saved.named_parameters())
    for name, param in original.named_parameters():
        assert torch.equal(param.to(torch.bfloat16), theirs[name].to(torch.bfloat16)), name
