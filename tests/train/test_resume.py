"""Faults and resumption: a SIGKILLed rank ends the job in bounded time (a frozen one: see
tests/test_distributed.py); rerunning the same command resumes from the last checkpoint with the
uninterrupted run's losses."""

import os
import signal

import pytest

from drope_megatron.train.checkpointing import STATE
from tests.helpers import ROOT, drope, torchrun
from tests.train import corpus as corpus_lib
from tests.train import faults
from tests.train.test_loop import losses, run

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".build" / "torch_extensions"))
STEPS = ["train.steps=12", "train.save_interval=3", "train.keep_last=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_lib.build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run(corpus, run_dir, *STEPS)
    return losses(run_dir)


@pytest.fixture(scope="module")
def uninterrupted(full_run):
    return full_run[0]


def job_args(corpus, run_dir, *extra):
    return ["pretrain", *corpus_lib.TRAIN_ARGS, *corpus_lib.data_args(corpus), f"train.save_dir={run_dir}",
            *STEPS, *extra, "--quiet"]


def test_sigkill_then_rerun_is_exact(corpus, tmp_path, uninterrupted, full_run):
    run_dir = tmp_path / "run"
    proc = faults.start(job_args(corpus, run_dir))
    faults.wait_for_step(run_dir, 5, proc)
    faults.kill_all(proc)
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert "drope: resuming" in run(corpus, run_dir, *STEPS).stderr
    assert losses(run_dir)[0] == uninterrupted  # bitwise: same process count, same data, same RNG
    assert [r["step"] for r in losses(run_dir)[1]] == list(range(1, 13))  # steps 4-5, logged twice, once
    assert [r["data_position"] for r in losses(run_dir)[1]] == [r["data_position"] for r in full_run[1]]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert kept == ["step00000009", "step00000012"]  # keep_last=2


def test_lost_rank_ends_job_and_rerun_resumes(corpus, tmp_path, uninterrupted):
    """A killed rank ends the job in bounded time, and a rerun resumes. (A frozen rank's collective
    times out as tests/test_distributed.py's frozen peer does; in this loop, SIGSTOP added only
    torchrun's fixed 30 s wait before it kills a stopped worker, and 45 s to the suite.)"""
    run_dir = tmp_path / "run"
    args = job_args(corpus, run_dir, "train.zero_stage=1", "parallel.timeout_minutes=0.1")
    proc = faults.start(args, nproc=2)
    faults.wait_for_step(run_dir, 5, proc)
    faults.rank_process(proc, 1).send_signal(signal.SIGKILL)
    rc, waited, err = faults.finish(proc, timeout=120)
    faults.kill_all(proc)
    assert rc != 0 and waited < 90, (rc, waited, err[-1500:])
    latest = int((run_dir / "checkpoints" / "latest").read_text().strip()[4:])
    proc = torchrun(2, ["-m", "drope_megatron.cli", *args], timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # From the checkpoint (a run from scratch would give the same losses too)
    assert "drope: resuming" in proc.stderr and f"at step {latest} " in proc.stderr, proc.stderr[-2000:]
    assert losses(run_dir)[0] == pytest.approx(uninterrupted, rel=1e-5, abs=1e-5)


def test_torchrun_max_restarts_resumes(corpus, tmp_path, uninterrupted):
    """torchrun restarts all workers after a rank dies; the new attempt resumes from `latest`."""
    run_dir = tmp_path / "run"
    args = job_args(corpus, run_dir, "train.zero_stage=1", "parallel.timeout_minutes=0.1")
    proc = faults.start(args, nproc=2, torchrun_args=("--max-restarts=1",))
    faults.wait_for_step(run_dir, 5, proc)
    faults.rank_process(proc, 1).send_signal(signal.SIGKILL)
    rc, _, err = faults.finish(proc, timeout=180)
    assert rc == 0, err[-2000:]
    assert "drope: resuming" in err, err[-2000:]  # a second attempt started from a checkpoint
    assert losses(run_dir)[0] == pytest.approx(uninterrupted, rel=1e-5, abs=1e-5)


def test_kill_during_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    for _ in range(3):  # the kill can land just after a write completes: start again and retry
        proc = faults.start(job_args(corpus, run_dir, "train.save_interval=1"))
        faults.wait_for_step(run_dir, 3, proc)  # a complete checkpoint exists before the one hit
        killed = faults.kill_during_checkpoint_write(ckpts, proc, STATE)
        if killed:
            break
    assert killed, "never caught a checkpoint mid-write"
    latest = (ckpts / "latest").read_text().strip()
    assert latest < killed and (ckpts / latest / STATE).is_file() and not (ckpts / killed / STATE).exists()
    proc = run(corpus, run_dir, *STEPS)  # loads `latest`, rewrites the half-written one
    assert f"at step {int(latest[4:])} " in proc.stderr  # resumed from the previous checkpoint, not from scratch
    values, rows = losses(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # the steps after it logged once, by the rerun
    assert values == pytest.approx(uninterrupted, rel=1e-6, abs=1e-6)


def test_resume_at_another_world_size_is_refused(corpus, tmp_path, capsys):
    from drope_megatron.cli import main

    run_dir = tmp_path / "run"
    run(corpus, run_dir, "train.steps=3", "train.zero_stage=1")
    proc = torchrun(2, ["-m", "drope_megatron.cli", *job_args(corpus, run_dir, "train.zero_stage=1")], timeout=240)
    assert proc.returncode != 0
    assert "was written with other settings (dp=1 now 2)" in proc.stderr
    refused = [  # the real command line, in this process (a child each would cost seconds of imports)
        # DeepSpeed would restore the saved learning rate over the recipe's, and fail on another precision.
        (["train.lr=1e-4", "train.precision=bf16"],
         "was written with other settings (bf16=False now True, train.lr=0.001 now 0.0001)"),
        # Fewer steps than the checkpoint has: the loop would not run and `final` would be step 3's.
        (["train.steps=2"], "has a checkpoint at step 3, past train.steps=2"),
        # Another model: refused in one line before DeepSpeed's load (which failed with a traceback).
        (["model.qk_norm=true"], "(model.qk_norm=False now True)"),
        # DeepSpeed would keep the saved optimizer's decay and betas over the recipe's.
        (["train.weight_decay=0.1", "train.adam_beta2=0.95"],
         "(train.weight_decay=0.0 now 0.1, train.adam_beta2=0.999 now 0.95)"),
    ]
    for extra, message in refused:
        assert main(job_args(corpus, run_dir, "train.zero_stage=1", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err, err[-800:]
