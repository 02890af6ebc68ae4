"""Pipeline parallelism: a dist checkpoint saved at TP=1/PP=1 loads at other TP x PP layouts and
megatron's pipeline schedule (real processes, gloo p2p) gives the unsharded losses."""

import json
import sys

import pytest

from tests.helpers import run, torchrun

PROBE = "tests/workers/pp_probe.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    ckpt = root / "ckpt"
    proc = run([sys.executable, PROBE, "save", str(ckpt), str(root), "1", "1"], timeout=120)  # then runs it
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpt, json.loads((root / "losses.json").read_text())


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_stages_reproduce_unsharded_losses(reference, tmp_path, tp, pp):
    ckpt, expected = reference
    proc = torchrun(tp * pp, [PROBE, "run", str(ckpt), str(tmp_path), str(tp), str(pp)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["last_stage_layers"] == [3, 4]  # the last of two stages holds the second half of the layers
    assert got["losses"] == pytest.approx(expected["losses"], abs=1e-5)
    assert expected["last_stage_layers"] == [1, 2, 3, 4]
