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


def test_tensorboard_mirrors_the_log_and_forgets_steps_past_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLog(tmp_path, tensorboard=True, enabled=True)
    for step in range(1, 6):
        first.log(step, {"loss": 1.0 / step, "phase": "drope"})  # text is for the JSON lines only
    first.close()
    resumed = MetricsLog(tmp_path, tensorboard=True, enabled=True, start=3)
    resumed.log(4, {"loss": 0.75})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.75)]
    # A rerun before the first checkpoint starts over: every earlier event goes, as every JSON line does.
    again = MetricsLog(tmp_path, tensorboard=True, enabled=True, start=0)
    again.log(1, {"loss": 2.0})
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0)]
