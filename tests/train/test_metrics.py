"""metrics.jsonl across a resume: lines past the checkpoint (and one cut by a crash) are dropped,
the new run appends; rank > 0 writes nothing."""

from __future__ import annotations

import json

from drope_megatron.train.metrics import MetricsLog


def test_a_resumed_log_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-line
    log = MetricsLog(tmp_path, tensorboard=False, enabled=True, start=3)
    log.log(4, {"loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5 and "time" in rows[-1]


def test_a_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "run", tensorboard=False, enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()
