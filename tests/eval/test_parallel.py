"""`drope eval` under torchrun gives the numbers of one process: at TP=2, and with two
data-parallel ranks that split the documents and prompts between them. A Hugging Face model,
which TP does not split, is shared out over every process in both layouts."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import drope, torchrun

# Two documents and two prompts per cell: with two data-parallel ranks, each scores one.
ARGS = ["--lengths", "1x,2x", "--tasks", "ppl,passkey", "--baselines", "yarn", "--documents", "2", "--samples", "1",
        "--depths", "0.25,0.75"]


@pytest.fixture(scope="module")
def heldout(corpus, tmp_path_factory):
    """The corpus's long held-out document as two documents (its halves)."""
    text = json.loads((corpus / "heldout.jsonl").read_text().splitlines()[0])["text"]
    path = tmp_path_factory.mktemp("eval_data") / "halves.jsonl"
    path.write_text("".join(json.dumps({"text": half}) + "\n" for half in (text[:len(text) // 2], text[len(text) // 2:])))
    return path


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):
    """Our RoPE checkpoint and its Hugging Face export."""
    from drope_megatron.convert.megatron_to_hf import export

    hf = tmp_path_factory.mktemp("eval_hf") / "hf"
    export(checkpoints["rope"], hf, show_progress=False)
    return [f"rope={checkpoints['rope']}", f"hf={hf}"]


@pytest.fixture(scope="module")
def one_process(models, heldout, tmp_path_factory):
    from drope_megatron.cli import main

    out = tmp_path_factory.mktemp("eval_one") / "report"
    # The real command line, in this process (a child would spend seconds on its imports).
    assert main(["eval", *models, "--out", str(out), *ARGS, "--data", str(heldout), "--quiet"]) == 0
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_two_processes_equal_one(models, heldout, one_process, tmp_path, tp):
    two = torchrun(2, ["-m", "drope_megatron.cli", "eval", *models, "--tp", str(tp), "--out",
                       str(tmp_path / "two"), *ARGS, "--data", str(heldout)], timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    # Rank 0's progress bars count its share: both documents and prompts of our model at TP=2, one of
    # each as one of two data-parallel ranks; one of each of the HF model's in both layouts.
    shares = {"rope": 2 if tp == 2 else 1, "hf": 1}
    for label, share in shares.items():
        for bar in (f"ppl {label} 384", f"{label} passkey 384"):
            assert re.search(rf"{bar}: +0%\|[^|]*\| 0/{share} ", two.stderr), two.stderr[-2000:]
    a, b = one_process, json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert list(a) == list(b) == ["rope", "rope+yarn", "hf", "hf+yarn"]
    for row in a:
        for length in ("1x", "2x"):
            ppl, passkey = b[row]["ppl"][length], b[row]["passkey"][length]
            assert ppl["ppl"] == pytest.approx(a[row]["ppl"][length]["ppl"], rel=1e-4)
            assert ppl["position_loss"] == pytest.approx(a[row]["ppl"][length]["position_loss"], rel=1e-4)
            assert (ppl["documents"], passkey["samples"]) == (2, 2)  # counted once, whichever rank scored them
            assert passkey["by_depth"] == a[row]["passkey"][length]["by_depth"]
            # the same greedy tokens, not only the same (random-model) score
            assert passkey["example"] == a[row]["passkey"][length]["example"]
