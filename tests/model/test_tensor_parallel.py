"""Tensor parallelism: TP=2 on two real torchrun processes gives TP=1's losses to 1e-5, and its
gradient norms (Adam's steps hide a gradient's scale from the losses: a doubled or halved
gradient of a replicated weight would pass on losses alone)."""

import json

import pytest

from tests.helpers import TINY, drope, torchrun

CASES = {
    "rope-drope-layers": (["model.rope_layers=[1]"], "rope,drope,layers"),
    "qk-norm": (["model.qk_norm=true"], "rope,drope"),
    # Per-head norms are whole on every rank but see only its heads: their gradient is summed over TP.
    "qk-head-norm": (["model.qk_head_norm=true"], "rope,drope"),
}


def smoke_losses(tmp_path, name, tp, extra, phases):
    out = tmp_path / f"{name}-tp{tp}.json"
    args = ["smoke", *TINY, *extra, f"parallel.tensor_model_parallel_size={tp}", "train.lr=3e-3",
            "--phases", phases, "--steps", "4", "--quiet", "--metrics", str(out)]
    proc = torchrun(2, ["-m", "drope_megatron.cli", *args]) if tp == 2 else drope(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", CASES)
def test_tp2_matches_tp1(tmp_path, name):
    extra, phases = CASES[name]
    one = smoke_losses(tmp_path, name, 1, extra, phases)
    two = smoke_losses(tmp_path, name, 2, extra, phases)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["local_params"] < one["local_params"]  # each rank really holds a shard
    for phase in phases.split(","):
        assert len(one["losses"][phase]) == 4
        assert two["losses"][phase] == pytest.approx(one["losses"][phase], abs=1e-5), phase
        assert two["grad_norms"][phase] == pytest.approx(one["grad_norms"][phase], rel=1e-4), phase


def test_smoke_refuses_world_size_other_than_tp():
    proc = torchrun(2, ["-m", "drope_megatron.cli", "smoke", *TINY, "--steps", "2", "--quiet"])
    assert proc.returncode != 0
    assert "smoke needs world size == TP (1), got 2" in proc.stderr
