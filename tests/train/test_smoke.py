"""`drope smoke`: the smallest end-to-end run, one real process, losses written atomically."""

import json

import pytest

from tests.helpers import TINY, drope


def test_smoke_trains_every_phase_and_writes_metrics(tmp_path):
    out = tmp_path / "metrics" / "smoke.json"
    proc = drope("smoke", *TINY, "model.rope_layers=[0]", "train.lr=3e-3", "--phases", "rope,drope,layers",
                 "--steps", "4", "--quiet", "--metrics", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["losses"]) == ["rope", "drope", "layers"]
    for phase, losses in result["losses"].items():
        assert len(losses) == 4 and losses[-1] < losses[0]
        assert f"{phase:>7}: loss" in proc.stdout
    assert [p.name for p in out.parent.iterdir()] == ["smoke.json"]  # no temporary file left behind


@pytest.mark.parametrize("args,message", [
    (["--phases", "rope,nope"], "--phases 'rope,nope'"),
    (["--phases", "layers"], "set model.rope_layers"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["parallel.pipeline_model_parallel_size=2"], "smoke runs without pipeline parallelism"),
])
def test_smoke_rejects_bad_arguments(args, message, tmp_path):
    out = tmp_path / "m.json"
    proc = drope("smoke", *TINY, *args, "--quiet", "--metrics", str(out))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
