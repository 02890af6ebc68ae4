"""The `drope` command: help texts and argument errors."""

import pytest

from tests.helpers import drope


def test_top_level_help_lists_subcommands():
    proc = drope("--help", timeout=60)
    assert proc.returncode == 0 and not proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("COMMAND\n")[1].split("\n\n")[0].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == ["config", "smoke", "pretrain", "recalibrate", "convert", "eval", "demo"]


@pytest.mark.parametrize("command", ["config", "smoke"])
def test_subcommand_help(command):
    proc = drope(command, "--help", timeout=60)
    assert proc.returncode == 0 and f"usage: drope {command}" in proc.stdout
    assert "train.lr=1e-4" in proc.stdout  # the override syntax is documented on every command


def test_no_subcommand_is_a_usage_error():
    proc = drope(timeout=60)
    assert proc.returncode == 2 and "usage: drope" in proc.stderr


@pytest.mark.parametrize("command, written, words", [
    ("recalibrate", "rope", "drope recalibrate trains without RoPE"),
    ("pretrain", "drope", "drope pretrain trains with RoPE in every layer"),
    ("pretrain", "layers", "drope pretrain trains with RoPE in every layer"),
])
def test_a_phase_the_command_does_not_train_is_refused(tmp_path, command, written, words):
    """The command decides the phase; a recipe that writes another one is refused before any work."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  phase: {written}\n  rope_layers: [0]\ntrain:\n  save_dir: {tmp_path / 'run'}\n")
    proc = drope(command, str(recipe), "--quiet", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"model.phase={written}, but {words}" in proc.stderr
    assert not (tmp_path / "run").exists()
