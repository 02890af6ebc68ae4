"""`drope eval` at TP=2 under torchrun gives the numbers of TP=1."""

from __future__ import annotations

import json

import pytest

from tests.helpers import drope, torchrun

ARGS = ["--lengths", "1x,2x", "--tasks", "ppl,passkey", "--baselines", "yarn", "--documents", "1", "--samples", "1",
        "--depths", "0.5", "--quiet"]


def test_tp2_eval_equals_tp1(checkpoints, corpus, tmp_path):
    data = ["--data", str(corpus / "heldout.jsonl")]
    one = drope("eval", str(checkpoints["rope"]), "--out", str(tmp_path / "tp1"), *ARGS, *data, timeout=180)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, ["-m", "drope_megatron.cli", "eval", str(checkpoints["rope"]), "--tp", "2", "--out",
                       str(tmp_path / "tp2"), *ARGS, *data], timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("tp1", "tp2"))
    assert list(a) == list(b) == ["rope", "rope+yarn"]
    for row in a:
        for length in ("1x", "2x"):
            assert b[row]["ppl"][length]["ppl"] == pytest.approx(a[row]["ppl"][length]["ppl"], rel=1e-4)
            assert b[row]["passkey"][length]["accuracy"] == a[row]["passkey"][length]["accuracy"]
            # the same greedy tokens, not only the same (random-model) score
            assert b[row]["passkey"][length]["example"] == a[row]["passkey"][length]["example"]
