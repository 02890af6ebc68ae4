"""A conversion process does not import TorchInductor's compiler (megatron-core's import-time
torch.compile wrappers would pull it in) nor see a GPU (on a GPU host CUDA's context and NCCL cost
seconds and host memory), and an in-process caller's environment is left as it was."""

from __future__ import annotations

import os
import sys

import pytest

from drope_megatron.cli import BARS_OFF, main
from tests.convert.hf_models import hf_config, save_hf_model
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("megatron_world")
PROBE = ("import sys; from drope_megatron.cli import main; code = main(sys.argv[1:], own_process=True); "
         "print('compiler imported:', 'torch._inductor.compile_fx' in sys.modules); "
         "import os; print('GPUs visible:', repr(os.environ.get('CUDA_VISIBLE_DEVICES'))); sys.exit(code)")
# The same command, called in a process that has not imported torch yet (a user's script).
CALLER = ("import os, sys; from drope_megatron.cli import main; code = main(sys.argv[1:]); "
          "print('environment:', [os.environ.get(k) for k in ('TORCHDYNAMO_DISABLE', 'CUDA_VISIBLE_DEVICES', "
          "'HF_DATASETS_DISABLE_PROGRESS_BARS')]); sys.exit(code)")
# A quiet in-process call in a process that has not imported datasets yet.
FIRST_IMPORT = ("import sys; from drope_megatron.cli import _datasets_quiet\n"
                "with _datasets_quiet(True, own_process=False):\n    import datasets\n"
                "    print('during:', datasets.is_progress_bar_enabled())\n"
                "print('after:', datasets.is_progress_bar_enabled())")


def test_conversion_in_a_fresh_process_imports_no_compiler(tmp_path):
    save_hf_model(tmp_path / "hf", hf_config("llama"))
    for args in (["hf-to-megatron", tmp_path / "hf", tmp_path / "meg"], ["megatron-to-hf", tmp_path / "meg",
                                                                        tmp_path / "out"]):
        proc = run([sys.executable, "-c", PROBE, "convert", *map(str, args), "--quiet"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "compiler imported: False" in proc.stdout
        assert "GPUs visible: ''" in proc.stdout


def test_a_caller_that_has_not_imported_torch_keeps_its_environment(tmp_path):
    save_hf_model(tmp_path / "hf", hf_config("llama"))
    proc = run([sys.executable, "-c", CALLER, "convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "meg"),
                "--quiet"], HF_DATASETS_DISABLE_PROGRESS_BARS="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "environment: [None, None, '0']" in proc.stdout


def test_datasets_first_imported_by_a_quiet_call_shows_its_bars_afterwards():
    proc = run([sys.executable, "-c", FIRST_IMPORT])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "during: False" in proc.stdout and "after: True" in proc.stdout


def test_a_quiet_call_silences_datasets_already_imported_and_restores_it():
    import datasets

    from drope_megatron.cli import _datasets_quiet

    assert datasets.is_progress_bar_enabled()
    with _datasets_quiet(True, own_process=False):
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()


def test_an_in_process_conversion_leaves_the_environment_alone(tmp_path):
    save_hf_model(tmp_path / "hf", hf_config("llama"))
    before = {k: os.environ.get(k) for k in ("TORCHDYNAMO_DISABLE", "CUDA_VISIBLE_DEVICES", BARS_OFF)}
    assert main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "meg"), "--quiet"]) == 0
    # torch is loaded here: dynamo and the GPUs stay as they are; --quiet's setting is undone
    assert {k: os.environ.get(k) for k in before} == before
