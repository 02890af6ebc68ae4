"""`drope eval` end to end through the real command line: report files, plots, bad input."""

from __future__ import annotations

import json

import pytest

from drope_megatron.config import ConfigError
from drope_megatron.data.indexed import write_indexed
from tests.eval.conftest import TRAIN_LENGTH, VOCAB
from tests.helpers import drope

PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_writes_json_table_and_plots(checkpoints, corpus, tmp_path):
    out = tmp_path / "report"
    proc = drope("eval", f"rope={checkpoints['rope']}", f"drope={checkpoints['drope']}", "--out", str(out),
                 "--lengths", "1x,2x", "--tasks", "ppl,passkey,niah_single", "--baselines", "pi,ntk,yarn",
                 "--data", str(corpus / "heldout.jsonl"), "--documents", "2", "--depths", "0,1", "--samples", "1",
                 "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["rope", "rope+pi", "rope+ntk", "rope+yarn", "drope"]
    ppl = results["rows"]["rope"]["ppl"]
    assert ppl["2x"]["length_tokens"] == 2 * TRAIN_LENGTH and ppl["1x"]["documents"] >= 1
    assert len(ppl["2x"]["position_loss"]) * ppl["2x"]["bin_width"] >= 2 * TRAIN_LENGTH - 1
    # At 1x every baseline is plain RoPE: identical numbers; past it they differ.
    for method in ("pi", "ntk", "yarn"):
        row = results["rows"][f"rope+{method}"]["ppl"]
        assert row["1x"]["ppl"] == ppl["1x"]["ppl"] and row["2x"]["ppl"] != ppl["2x"]["ppl"]
    assert results["rows"]["drope"]["ppl"]["1x"]["ppl"] != ppl["1x"]["ppl"]
    passkey = results["rows"]["drope"]["passkey"]["2x"]
    assert passkey["samples"] == 2 and set(passkey["by_depth"]) == {"0", "1"}
    assert passkey["accuracy"] <= passkey["found"] <= 1  # an exact answer found its needle
    for text, tokens in (("1x", TRAIN_LENGTH), ("2x", 2 * TRAIN_LENGTH)):  # prompts made at each length
        assert tokens - 8 <= results["rows"]["rope+yarn"]["niah_single"][text]["prompt_tokens"] <= tokens
    table = (out / "report.md").read_text()
    assert "| rope+yarn |" in table and "## passkey" in table and "## niah_single" in table
    assert "## passkey: needle found" in table
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["position_loss.png", "ppl_vs_length.png", "retrieval_niah_single.png", "retrieval_passkey.png"]
    assert all((out / p).read_bytes().startswith(PNG) and (out / p).stat().st_size > 5000 for p in plots)
    assert "rope+ntk" in proc.stdout


def test_bad_inputs_exit_2_and_write_nothing(checkpoints, corpus, tmp_path, capsys):
    from drope_megatron.cli import main

    out = tmp_path / "report"
    # Refused before any model is loaded: the real command line, in this process.
    early = [
        (["--tasks", "ppl"], "needs held-out documents"),
        (["--tasks", "summaries"], "--tasks has 'summaries'"),  # the flag's name, not the recipe key's
        (["--tasks", "passkey", "--baselines", "rope2"], "--baselines has 'rope2'"),
        (["--tasks", "passkey", "--lengths", "two"], "neither a multiple"),
        (["--tasks", "passkey", "--depths", "1.5"], "--depths must be fractions"),
        (["--tasks", "passkey", "--depths", "0,abc"], "--depths '0,abc'"),
        (["--tasks", "passkey", "--tp", "0"], "--tp 0 must be >= 1"),
        # --overwrite replaces the whole folder: never the current one (here, the repository).
        (["--tasks", "passkey", "--out", "."], ". is (or holds) the current folder"),
        (["--tasks", "ppl", "--data", str(corpus / "valid.jsonl"), "--lengths", "1"],
         "a length of 1 token: perplexity needs >= 2"),
        # --data takes every word up to the next option: a model after it is not read as a file
        (["--tasks", "ppl", "--data", str(corpus / "valid.jsonl"), f"B={checkpoints['drope']}"],
         f"--data 'B={checkpoints['drope']}' is not a data file"),
    ]
    for args, message in early:
        assert main(["eval", str(checkpoints["rope"]), "--out", str(out), "--quiet", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert main(["eval", str(tmp_path), "--out", str(out), "--tasks", "passkey"]) == 2
    assert "neither a drope Megatron checkpoint nor a Hugging Face" in capsys.readouterr().err
    # A folder of other files is not replaced, --overwrite or not.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["eval", str(checkpoints["rope"]), "--out", str(tmp_path / "mine"), "--overwrite", "--quiet",
                 "--tasks", "passkey"]) == 2
    assert "holds other files (no results.json" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # A second model's broken config is found before the first model runs.
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "nonexistent_arch"}')
    assert main(["eval", str(checkpoints["rope"]), str(tmp_path / "odd"), "--out", str(out), "--quiet",
                 "--tasks", "passkey"]) == 2
    assert "odd/config.json cannot be read by transformers" in capsys.readouterr().err
    # Token ids past the model's vocabulary in an indexed set (another tokenizer's): refused, not embedded.
    write_indexed([list(range(VOCAB - 5, VOCAB + 295))], tmp_path / "ids", vocab_size=2 * VOCAB)
    assert main(["eval", str(checkpoints["rope"]), "--out", str(out), "--quiet", "--tasks", "ppl", "--data",
                 str(tmp_path / "ids"), "--lengths", "64"]) == 2
    assert f"holds token id {VOCAB + 294} but the model's vocabulary is {VOCAB}" in capsys.readouterr().err
    assert not out.exists()
    # Found only once the tokenizer reads the documents: a real child process, nothing half-written.
    proc = drope("eval", str(checkpoints["rope"]), "--out", str(out), "--quiet", "--tasks", "ppl", "--data",
                 str(corpus / "valid.jsonl"), "--lengths", "64x", timeout=120)
    assert proc.returncode == 2 and "has 12288 tokens" in proc.stderr, proc.stderr[-500:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-500:]
    assert not out.exists() and not list(tmp_path.glob(".report*"))


def test_model_specs_split_at_a_label_not_inside_a_path(checkpoints, tmp_path):
    from drope_megatron.eval.runner import parse_models

    swept = tmp_path / "lr=1e-4"  # sweep folders name their settings
    swept.symlink_to(checkpoints["rope"], target_is_directory=True)
    assert parse_models([str(swept)]) == {"lr=1e-4": swept}
    assert parse_models([f"DroPE={swept}", f"RoPE={checkpoints['rope']}"]) == {
        "DroPE": swept, "RoPE": checkpoints["rope"]}
    with pytest.raises(ConfigError, match="two models are labelled 'lr=1e-4': name them with label=path"):
        parse_models([str(swept), str(swept)])
    # RoPE's PI row is RoPE+pi: a model so labelled would overwrite it.
    with pytest.raises(ConfigError, match="model label 'RoPE\\+pi' has a '\\+'"):
        parse_models([f"RoPE={checkpoints['rope']}", f"RoPE+pi={swept}"])


def test_niah_names_every_ruler_task_once_in_a_stable_order():
    from drope_megatron.eval.runner import expand_tasks
    from drope_megatron.eval.tasks import NIAH

    assert expand_tasks(["ppl", "niah_single", "niah", "passkey", "ppl"]) == ["ppl", *NIAH, "passkey"]
