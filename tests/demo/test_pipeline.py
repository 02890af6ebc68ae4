"""`drope demo --smoke`: every stage of the real pipeline at tiny sizes, then a rerun that reuses them."""

from __future__ import annotations

import json

import pytest

from drope_megatron.data.tokenizer import load_tokenizer
from drope_megatron.demo.pipeline import SHIPPED, Demo
from tests.helpers import drope

STAGES = ["corpus", "data", "rope", "drope", "eval", "export", "report"]


def test_smoke_demo_runs_every_stage_then_reuses_them(tmp_path):
    work = tmp_path / "demo"
    proc = drope("demo", "--smoke", "--work", str(work), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in STAGES:
        assert f"[demo] {stage}: running" in proc.stdout
    log = json.loads((work / "stages.json").read_text())
    assert list(log["seconds"]) == STAGES
    results = json.loads((work / "eval" / "results.json").read_text())
    assert list(results["rows"]) == ["RoPE", "RoPE+pi", "RoPE+ntk", "RoPE+yarn", "DroPE"]
    assert results["models"]["DroPE"]["phase"] == "drope" and results["models"]["RoPE"]["train_length"] == 256
    report = (work / "report.md").read_text()
    assert "| DroPE |" in report and "Smoke run" in report and "drope recalibrate" in report
    assert "passkey at 2x: DroPE" in report and "needle found: DroPE" in report
    for plot in ("ppl_vs_length.png", "position_loss.png", "retrieval_passkey.png"):
        assert (work / "eval" / plot).read_bytes().startswith(b"\x89PNG") and f"eval/{plot}" in report
    config = json.loads((work / "drope-hf" / "config.json").read_text())
    assert config["architectures"] == ["SmolLM3ForCausalLM"] and not any(config["no_rope_layers"])
    from transformers import AutoTokenizer  # the export's tokenizer loads and encodes as the model's

    text = "The pass key is 12345.\n\nACT I."
    exported = AutoTokenizer.from_pretrained(str(work / "drope-hf"))(text, add_special_tokens=False)["input_ids"]
    assert exported == load_tokenizer(work / "rope" / "tokenizer").encode(text)
    trained = json.loads((work / "drope" / "metrics.jsonl").read_text().splitlines()[-1])
    assert trained["step"] == 3

    again = drope("demo", "--smoke", "--work", str(work), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in STAGES[:-1]:
        assert f"[demo] {stage}: reused" in again.stdout
    assert "$ drope" not in again.stdout  # nothing was rerun
    assert json.loads((work / "stages.json").read_text())["seconds"] == log["seconds"] | {
        "report": json.loads((work / "stages.json").read_text())["seconds"]["report"]}

    # Another override: the recalibration starts afresh (no resume from the old run's checkpoints),
    # the stages before it are reused, and the evaluation after it is stale and runs again.
    changed = drope("demo", "--smoke", "--work", str(work), "--until", "drope", "train.lr=1e-3", timeout=180)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert all(f"[demo] {stage}: reused" in changed.stdout for stage in STAGES[:3])
    assert "[demo] drope: running" in changed.stdout and "train.lr=1e-3" in changed.stdout
    assert f"[demo] drope: its inputs changed: removing the earlier run {work / 'drope'}" in changed.stdout
    assert "drope: resuming" not in changed.stderr
    assert f"[demo] stopped after drope: {work}" in changed.stdout and "# DroPE demo" not in changed.stdout
    stale = drope("demo", "--smoke", "--work", str(work), "--until", "eval", "train.lr=1e-3", timeout=180)
    assert stale.returncode == 0 and "[demo] drope: reused" in stale.stdout and "[demo] eval: running" in stale.stdout
    # An eval.* override reaches the evaluation (through a recipe holding it, over the smoke sizes)
    # and reruns it alone.
    seeded = drope("demo", "--smoke", "--work", str(work), "--until", "eval", "train.lr=1e-3", "eval.seed=7",
                   "eval.samples=2", timeout=180)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    assert "[demo] drope: reused" in seeded.stdout and f"--recipe {work / 'eval-recipe.yaml'}" in seeded.stdout
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["seed"] == 7 and results["rows"]["DroPE"]["passkey"]["1x"]["samples"] == 2 * 2  # x 2 depths
    # A stage that fails exits with its command's status: 3, the recalibration diverged.
    diverged = drope("demo", "--smoke", "--work", str(work), "--until", "drope", "train.lr=1e12", timeout=180)
    assert diverged.returncode == 3, diverged.stderr[-2000:]
    assert "drope: error: demo stage failed: drope recalibrate" in diverged.stderr


def test_pretraining_here_until_the_rope_stage(tmp_path):
    """`--pretrain`: the RoPE model is trained here with the corpus's own tokenizer, exported to
    Hugging Face and converted back; `--until rope` stops there."""
    work = tmp_path / "demo"
    proc = drope("demo", "--smoke", "--pretrain", "--until", "rope", "--work", str(work), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "$ drope pretrain" in proc.stdout and "[demo] drope: running" not in proc.stdout
    assert list(json.loads((work / "stages.json").read_text())["seconds"]) == STAGES[:3]
    assert (work / "pretrain" / "final").is_dir() and (work / "rope-hf" / "config.json").is_file()
    used = (work / "rope" / "tokenizer" / "tokenizer.model").read_bytes()
    assert used == (work / "corpus" / "tokenizer.model").read_bytes() != (SHIPPED / "tokenizer.model").read_bytes()
    assert not (work / "drope").exists() and not (work / "eval").exists()
    bad = drope("demo", "--until", "train", "--work", str(work), timeout=60)
    assert bad.returncode == 2 and "--until 'train': use one of corpus, data" in bad.stderr
    # A bad eval.* override is refused before any stage runs, not after the training.
    early = drope("demo", "--work", str(tmp_path / "other"), "eval.lengths=[]", timeout=60)
    assert early.returncode == 2 and "eval.lengths and eval.tasks must not be empty" in early.stderr
    assert not (tmp_path / "other").exists()


def test_a_model_override_the_shipped_model_cannot_take_is_refused_before_any_stage(tmp_path):
    """On a first run WORK/rope is not there yet: the override is checked against the shipped model
    it will be, not after the corpus, data and conversion stages."""
    from drope_megatron.config import ConfigError
    from drope_megatron.demo.pipeline import Demo

    with pytest.raises(ConfigError, match="model.hidden_size=512.*builds that checkpoint's architecture"):
        Demo(work=tmp_path / "first", overrides=["model.hidden_size=512"]).run()
    assert not (tmp_path / "first").exists()


def test_a_run_folder_the_demo_did_not_make_is_kept(tmp_path, capsys):
    """A user's own `drope recalibrate` into WORK/drope (or an older demo's, with no record of its
    inputs) is continued, never removed; the demo's own earlier run with other inputs is replaced."""
    from drope_megatron.demo.pipeline import Demo

    demo = Demo(work=tmp_path)
    (tmp_path / "drope").mkdir()
    (tmp_path / "drope" / "metrics.jsonl").write_text("{}\n")
    demo._start("drope", {"overrides": ["train.lr=1e-3"]}, tmp_path / "stages.json")
    assert (tmp_path / "drope" / "metrics.jsonl").is_file()
    demo._start("drope", {"overrides": ["train.lr=1e-3"]}, tmp_path / "stages.json")  # same inputs: resumed
    assert (tmp_path / "drope" / "metrics.jsonl").is_file()
    demo._start("drope", {"overrides": []}, tmp_path / "stages.json")
    assert not (tmp_path / "drope").exists() and "removing the earlier run" in capsys.readouterr().out
    assert json.loads((tmp_path / "stages.json").read_text())["inputs"]["drope"] == {"overrides": []}


def test_overrides_reach_what_they_name(tmp_path):
    """eval.data replaces the held-out split; a work folder holding ' #' or ', ' stays one path; runs
    placed outside the work folder are refused before anything is made."""
    from drope_megatron.config import ConfigError
    from drope_megatron.demo.pipeline import Demo, _setting
    from drope_megatron.typed_yaml import apply_override

    work = tmp_path / "demo #2, final"
    args = Demo(work=work, overrides=["eval.data=[/data/mine.jsonl]"])._eval_args()
    assert "--data" not in args and "/data/mine.jsonl" in (work / "eval-recipe.yaml").read_text()
    plain = Demo(work=work)._eval_args()
    assert plain[plain.index("--data") + 1] == str(work / "corpus" / "heldout.jsonl")
    raw = {}
    for item in [_setting("train.save_dir", work / "drope"), _setting("data.paths", [str(work / "a"), "b"])]:
        apply_override(raw, item)
    assert raw == {"train": {"save_dir": str(work / "drope")}, "data": {"paths": [str(work / "a"), "b"]}}
    assert _setting("data.paths", ["runs/demo/a", "runs/demo/b"]) == "data.paths=[runs/demo/a,runs/demo/b]"
    assert _setting("train.init_from", tmp_path / "1234") == f"train.init_from={tmp_path / '1234'}"
    assert _setting("train.save_dir", "1234") == 'train.save_dir="1234"'  # bare, YAML would read a number
    for key in ("train.save_dir", "train.init_from"):
        with pytest.raises(ConfigError, match=f"demo override {key}=/elsewhere: .* choose that with --work"):
            Demo(work=tmp_path / "never", overrides=[f"{key}=/elsewhere"]).run()
    assert not (tmp_path / "never").exists()


def test_a_stage_is_done_only_while_its_output_is_there_and_not_while_it_runs(tmp_path):
    demo = Demo(work=tmp_path)
    inputs = {"model": "m", "after": 1.0}
    demo.log = {"seconds": {}, "commands": {}, "inputs": {"export": inputs}, "made": {"export": 2.0}}
    output = tmp_path / "drope-hf" / "config.json"
    output.parent.mkdir()
    output.write_text("{}")
    assert demo._done("export", inputs) and not demo._done("export", {**inputs, "after": 3.0})
    output.unlink()  # deleted since: made again
    assert not demo._done("export", inputs)
    output.write_text("{}")
    demo._start("export", inputs, tmp_path / "stages.json")  # interrupted from here on: what is there is stale
    assert not demo._done("export", inputs)
    assert json.loads((tmp_path / "stages.json").read_text())["made"] == {}
