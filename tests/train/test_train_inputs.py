"""Training: bad inputs end in one line and write nothing; launchers other than torchrun;
divergence stops the run; the QK-norm variant starts from a plain checkpoint."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from drope_megatron import checkpoint
from tests.helpers import ROOT, drope, run as run_cmd
from tests.train import corpus as corpus_lib
from tests.train.test_loop import losses, run

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_lib.build(tmp_path_factory.mktemp("corpus"))


def pretrain_args(corpus, run_dir, *extra):
    return ["pretrain", *corpus_lib.TRAIN_ARGS, *corpus_lib.data_args(corpus), f"train.save_dir={run_dir}",
            "train.steps=3", *extra, "--quiet"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from drope_megatron.data.indexed import write_indexed

    folder = tmp_path_factory.mktemp("tiny")
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("w1 w2 w3\n")
    write_indexed([[5, 6, 7] * 20] * 4, folder / "no-eos", vocab_size=160)  # preprocess_data.py without --append-eod
    return folder


def bad_cases(corpus, tiny):
    return {
        "missing-file": (["data.paths=[/nonexistent/a.txt]"], "data file /nonexistent/a.txt does not exist"),
        "empty-dataset": ([f"data.paths=[{tiny / 'empty.txt'}]"], "fewer than one block of 33"),
        "shorter-than-a-block": ([f"data.paths=[{tiny / 'short.txt'}]"], "fewer than one block of 33"),
        "vocab-mismatch": (["model.vocab_size=64"], "has 160 tokens but the model's vocabulary is 64"),
        "no-tokenizer": (["data.tokenizer=null"], "data.tokenizer is not set"),
        "pipeline": (["parallel.pipeline_model_parallel_size=2", "model.num_layers=2"],
                     "set parallel.pipeline_model_parallel_size=1"),
        "batch": (["train.global_batch_size=6", "train.micro_batch_size=4"], "is not a multiple"),
        "ds-json": (["train.deepspeed_config=/nonexistent.json"], "train.deepspeed_config /nonexistent.json does not"),
        "no-save-dir": (["train.save_dir=null", "train.export_hf=/nonexistent/hf", "train.tensorboard=true"],
                        "train.save_dir is not set, and train.export_hf, train.tensorboard write there"),
        "export-exists": ([f"train.export_hf={tiny}"], f"train.export_hf {tiny} already exists: name a new folder"),
        "no-eos": ([f"data.paths=[{tiny / 'no-eos'}]"], "document 0 does not end with the tokenizer's EOS"),
    }


@pytest.mark.parametrize("case", ["missing-file", "empty-dataset", "shorter-than-a-block", "vocab-mismatch",
                                  "no-tokenizer", "pipeline", "batch", "ds-json", "no-save-dir", "export-exists",
                                  "no-eos"])
def test_bad_training_input(corpus, tiny_files, tmp_path, case, capsys):
    from drope_megatron.cli import main

    extra, message = bad_cases(corpus, tiny_files)[case]
    run_dir = tmp_path / "run"
    # The real command line, in this process: a child each would spend seconds importing DeepSpeed.
    assert main(pretrain_args(corpus, run_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("drope: error:"), err[-2000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final").exists()
    if case in ("missing-file", "no-eos"):  # found before the run folder is made (before: an empty metrics.jsonl)
        assert not run_dir.exists()
    assert (tiny_files / "short.txt").is_file()  # an existing export folder is left as it was


def test_a_missing_tensorboard_is_found_by_every_rank_before_any_collective(corpus, tmp_path):
    """Rank 1 of a 2-task srun step, alone here (no rank 0 to meet), fails at once on its own: a
    launcher that does not end a job when one task fails (srun without --kill-on-bad-exit) would
    otherwise leave it waiting for a rank 0 that stopped. The package is hidden behind one that
    fails to import, whether or not it is installed."""
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    start = time.monotonic()
    proc = drope(*pretrain_args(corpus, tmp_path / "run", "train.tensorboard=true", "parallel.timeout_minutes=1"),
                 timeout=120, PYTHONPATH=f"{shim.parent}{os.pathsep}{ROOT}", SLURM_PROCID="1",
                 SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.tensorboard=true needs the tensorboard package" in proc.stderr
    assert time.monotonic() - start < 40  # the rendezvous would wait a minute for rank 0


def test_more_tp_than_ranks_is_refused(corpus, tmp_path):
    proc = drope(*pretrain_args(corpus, tmp_path / "run", "parallel.tensor_model_parallel_size=2"))
    assert proc.returncode == 2 and "world size 1 is not a multiple of TP*PP=2" in proc.stderr


def test_divergence_stops_with_a_pointer_to_the_last_checkpoint(corpus, tmp_path):
    proc = drope(*pretrain_args(corpus, tmp_path / "run", "train.lr=1e30", "train.steps=6", "train.save_interval=1",
                                "train.grad_clip=0"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert any(f"{what} is {value}" in proc.stderr for what in ("loss", "gradient norm") for value in ("nan", "inf"))
    named = proc.stderr.split("last good checkpoint: ")[1].split(" (")[0]
    assert named.endswith("step00000001"), named  # the first step's weights are still finite
    import torch

    # DeepSpeed pickles more than tensors; this is a file the run above just wrote.
    states = torch.load(Path(named) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in states.values() if torch.is_tensor(v))


def assert_two_ranks(rows):
    """ZeRO (1 and up) over two data-parallel ranks: each holds half of Adam's two moments."""
    first = rows[0]
    assert first["optimizer_state_local"] == pytest.approx(first["params_total"], rel=0.02)


def test_two_nodes_on_loopback(corpus, tmp_path):
    """cluster/torchrun-multinode.sh on two "nodes" (one process each) meeting by c10d rendezvous."""
    import subprocess

    from drope_megatron.distributed import free_port

    from tests.helpers import child_env

    env = child_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ID="loopback", MAX_RESTARTS="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # child_env drops launcher variables
    args = pretrain_args(corpus, tmp_path / "run", "train.zero_stage=2")
    procs = [subprocess.Popen(["cluster/torchrun-multinode.sh", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert all(p.returncode == 0 for p in procs), outs[1][1][-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["params_local"] == rows[0]["params_total"] and len(rows) == 3
    assert_two_ranks(rows)


def test_mpirun_job(corpus, tmp_path):
    """cluster/mpirun.sh (OpenMPI; as root and with 2 ranks on 2 cores, which OpenMPI must be told)."""
    cmd = ["cluster/mpirun.sh", *pretrain_args(corpus, tmp_path / "run", "train.zero_stage=1")]
    proc = run_cmd(cmd, timeout=240, NP="2", PYTHON=sys.executable, OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    seq, rows = losses(tmp_path / "run")
    assert len(seq) == 3 and seq[-1] < seq[0]
    assert_two_ranks(rows)


def test_qk_norm_variant_recalibrates_from_a_plain_checkpoint(corpus, tmp_path):
    run(corpus, tmp_path / "pre", "train.steps=2")
    shutil.rmtree(tmp_path / "pre" / "checkpoints")
    ds = json.loads((ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    run(corpus, tmp_path / "rec", "train.steps=3", f"train.init_from={tmp_path / 'pre' / 'final'}",
        "model.qk_norm=true", "model.softmax_scale=0.25", f"train.deepspeed_config={tmp_path / 'zero3.json'}",
        "model.seq_length=16", nproc=2, command="recalibrate")
    m = checkpoint.model_config(tmp_path / "rec" / "final")
    assert m.qk_norm and m.phase == "drope" and m.softmax_scale == 0.25  # the recipe's options over the stored
    assert m.seq_length == 16  # and its context (the checkpoint's was 32)
    first = losses(tmp_path / "rec")[1][0]
    assert first["params_local"] == pytest.approx(first["params_total"] / 2, rel=0.02)  # ZeRO-3 from the JSON


def test_deepspeed_launcher(corpus, tmp_path):
    """cluster/deepspeed-hostfile.sh on one node (DeepSpeed reaches a hostfile's hosts over ssh,
    which this machine has not got)."""
    from drope_megatron.distributed import free_port

    cmd = ["cluster/deepspeed-hostfile.sh", *pretrain_args(corpus, tmp_path / "run", "train.zero_stage=1")]
    proc = run_cmd(cmd, timeout=240, NUM_GPUS="2", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    seq, rows = losses(tmp_path / "run")
    assert len(seq) == 3
    assert_two_ranks(rows)


def test_a_run_without_save_dir_says_it_keeps_nothing(corpus, megatron_world, capsys, monkeypatch):
    from drope_megatron.config import load_recipe
    from drope_megatron.train import engine
    from drope_megatron.train.loop import train

    recipe = load_recipe(None, [*corpus_lib.TRAIN_ARGS, *corpus_lib.data_args(corpus), "train.steps=1",
                                "train.global_batch_size=2", "model.num_query_groups=4"])
    fed, real = [], engine.initialize

    def watching(model, *args, **kwargs):  # the real engine; the model notes what each forward is given
        model.register_forward_pre_hook(lambda _, inputs, named: fed.append((inputs[0], named["labels"])),
                                        with_kwargs=True)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine, "initialize", watching)
    assert train(recipe, "rope", show_progress=False)["step"] == 1
    assert "train.save_dir is not set: this run keeps no checkpoint" in capsys.readouterr().err
    tokens, labels = fed[0]  # each position learns the token after it
    assert tokens.shape == labels.shape and torch.equal(labels[:, :-1], tokens[:, 1:])
