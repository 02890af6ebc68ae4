"""`drope pretrain` / `drope recalibrate`: real DeepSpeed engines, gloo, one and two processes."""

import json
import math
import os

import pytest
import torch

from drope_megatron import checkpoint
from tests.helpers import ROOT, drope, torchrun
from tests.train import corpus as corpus_lib

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_lib.build(tmp_path_factory.mktemp("corpus"))


def grad_norms(rows) -> dict:
    """The logged gradient norms by step: what DeepSpeed clips by (Adam's losses hide a gradient's scale)."""
    return {r["step"]: r["grad_norm"] for r in rows}


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}  # one record per step: a resume drops the lines past its checkpoint
    return [by_step[s]["loss"] for s in sorted(by_step)], rows


def _bf16_copy(src, dst):
    from drope_megatron import distributed
    from drope_megatron.config import ParallelConfig

    with distributed.session(single=True):
        model, m = checkpoint.load_model(src, ParallelConfig(), dtype="bfloat16")
        checkpoint.save(model, m, dst, tokenizer=src / "tokenizer")
    assert torch.bfloat16 in _stored_dtypes(dst)  # (megatron keeps the norms in fp32)
    return dst


def _stored_dtypes(ckpt):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt / "weights")).read_metadata().state_dict_metadata
    return {md.properties.dtype for md in metadata.values() if hasattr(md, "properties")}


def run(corpus, run_dir, *extra, nproc=1, command="pretrain"):
    args = [command, *corpus_lib.TRAIN_ARGS, *corpus_lib.data_args(corpus), f"train.save_dir={run_dir}", *extra,
            "--quiet"]
    proc = torchrun(nproc, ["-m", "drope_megatron.cli", *args]) if nproc > 1 else drope(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """One process, ZeRO off: the reference loss sequence."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    run(corpus, run_dir, "train.steps=4")
    return losses(run_dir)


def test_pretrain_then_recalibrate(corpus, tmp_path, baseline, capsys):
    baseline = baseline[0]
    pre = tmp_path / "pre"
    # A recipe's phase never changes what a command trains; the user is told (`drope config` prints it).
    proc = run(corpus, pre, "train.steps=6", "train.schedule=cosine", "train.warmup_steps=2", "model.phase=drope",
               "model.params_dtype=bfloat16")
    assert "drope: note: model.phase=drope does not apply: drope pretrain trains with RoPE" in proc.stderr
    assert "drope: note: model.params_dtype=bfloat16 does not apply: this run trains in float32" in proc.stderr
    seq, rows = losses(pre)
    assert len(seq) == 6 and seq[-1] < seq[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "rss_gib", "data_position"} <= set(rows[-1])
    # The rate each step used: linear warmup from 0 over 2 steps, then cosine towards 0.1x.
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in (0, 0.5, *cosine)])
    assert rows[0]["grad_norm"] > 0
    assert checkpoint.model_config(pre / "final").phase == "rope"
    from drope_megatron.cli import main  # the real command line, in this process

    wrong = ["recalibrate", *corpus_lib.TRAIN_ARGS, *corpus_lib.data_args(corpus), f"train.save_dir={pre}",
             "train.steps=6", f"train.init_from={pre / 'final'}", "--quiet"]  # the pretraining's run folder
    assert main(wrong) == 2 and "phase=rope now drope" in capsys.readouterr().err
    bf16 = _bf16_copy(pre / "final", tmp_path / "bf16")  # as `hf-to-megatron` keeps a bf16 source
    rec = tmp_path / "rec"
    proc = run(corpus, rec, "train.steps=4", f"train.init_from={bf16}", f"train.export_hf={tmp_path / 'hf'}",
               "model.phase=rope", "model.rope_layers=[0]", "train.log_interval=3", command="recalibrate")
    assert [r["step"] for r in losses(rec)[1]] == [1, 3, 4]  # the first, every third and the last
    assert "drope: note: model.phase=rope does not apply: drope recalibrate trains without RoPE" in proc.stderr
    assert "drope: note: model.rope_layers=[0] does not apply: RoPE stays in those layers under model.phase=layers " \
        "only, and this run trains phase drope" in proc.stderr
    assert "step 4: loss" in proc.stdout and "SmolLM3ForCausalLM" in proc.stdout
    assert "examples/s" not in proc.stderr  # --quiet: no progress bars from datasets either
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "SmolLM3ForCausalLM"
    m = checkpoint.model_config(rec / "final")
    assert m.phase == "drope" and m.seq_length == 32 and m.rope_layers is None
    # Without bf16 (a CPU) the bf16 checkpoint trained in fp32: DeepSpeed keeps no master weights then.
    assert m.params_dtype == "float32" and _stored_dtypes(rec / "final") == {torch.float32}
    first = losses(rec)[0][0]
    assert first < baseline[0]  # starts from the pretrained weights, not from scratch
    # The pretraining resumed for 2 more steps: their rates are the 8-step schedule's (before, the
    # first took the 6-step schedule's last rate, restored with the optimizer).
    run(corpus, pre, "train.steps=8", "train.schedule=cosine", "train.warmup_steps=2", "model.phase=drope",
        "model.params_dtype=bfloat16")
    longer = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in (6, 7)]
    assert [r["lr"] for r in losses(pre)[1][6:]] == pytest.approx(longer)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_on_two_processes_matches_one(corpus, tmp_path, baseline, stage):
    baseline, baseline_rows = baseline
    run(corpus, tmp_path / "run", "train.steps=4", f"train.zero_stage={stage}", nproc=2)
    seq, rows = losses(tmp_path / "run")
    assert seq == pytest.approx(baseline, rel=1e-5, abs=1e-5)
    assert grad_norms(rows) == pytest.approx(grad_norms(baseline_rows), rel=1e-4)
    first = rows[0]
    if stage == 3:  # each rank holds half of the parameters and of the optimizer state
        assert first["params_local"] == pytest.approx(first["params_total"] / 2, rel=0.02)
    else:  # ZeRO 1-2 partition the optimizer state only
        assert first["params_local"] == first["params_total"]
    assert first["optimizer_state_local"] == pytest.approx(2 * first["params_total"] / 2, rel=0.02)


def test_optimizer_offload_matches(corpus, tmp_path, baseline):
    run(corpus, tmp_path / "run", "train.steps=4", "train.zero_stage=2", "train.offload_optimizer=true", nproc=2)
    assert losses(tmp_path / "run")[0] == pytest.approx(baseline[0], rel=1e-5, abs=1e-5)


def test_compiled_layers_match(corpus, tmp_path, baseline):
    run(corpus, tmp_path / "run", "train.steps=4", "train.compile_layers=true")
    assert losses(tmp_path / "run")[0] == pytest.approx(baseline[0], rel=1e-5, abs=1e-5)
    from drope_megatron import distributed
    from drope_megatron.config import ParallelConfig

    with distributed.session(single=True):  # the usual keys: a load refuses any it cannot place
        checkpoint.load_model(tmp_path / "run" / "final", ParallelConfig())


@pytest.mark.parametrize("stage", [0, 1])  # ZeRO 0 measures the norm itself (TP-aware), ZeRO 1 DeepSpeed
def test_tp2_matches_tp1(corpus, tmp_path, baseline, stage):
    run(corpus, tmp_path / "run", "train.steps=4", f"train.zero_stage={stage}", "parallel.tensor_model_parallel_size=2",
        "train.micro_batch_size=8", nproc=2)
    seq, rows = losses(tmp_path / "run")
    assert seq == pytest.approx(baseline[0], rel=1e-5, abs=1e-5)
    assert grad_norms(rows) == pytest.approx(grad_norms(baseline[1]), rel=1e-4)  # split weights counted whole
    assert rows[0]["params_local"] < baseline[1][0]["params_local"]  # each rank holds TP shards


def test_bf16_training_records_its_weights_as_bf16(corpus, tmp_path, baseline):
    run(corpus, tmp_path / "bf16", "train.steps=2", "train.precision=bf16")
    final = tmp_path / "bf16" / "final"
    # DeepSpeed trained (and saved) bf16 weights; the metadata said float32, so exports doubled in size.
    assert checkpoint.model_config(final).params_dtype == "bfloat16" and torch.bfloat16 in _stored_dtypes(final)
    # At ZeRO 0 DeepSpeed's bf16 wrapper reports the gradient norm: the fp32 run's, to bf16's precision
    # (no loss scale in it), and not measured a second time.
    assert losses(tmp_path / "bf16")[1][0]["grad_norm"] == pytest.approx(baseline[1][0]["grad_norm"], rel=0.03)
