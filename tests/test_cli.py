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


def test_overrides_may_follow_options():
    """Before, `drope smoke R --steps 3 train.lr=1e-3` stopped with "unrecognized arguments"."""
    from drope_megatron.cli import parse

    args = parse(["smoke", "r.yaml", "train.steps=2", "--steps", "3", "train.lr=1e-3"])
    assert (args.recipe, args.overrides, args.steps) == ("r.yaml", ["train.steps=2", "train.lr=1e-3"], 3)
    assert parse(["eval", "a", "--out", "o", "B=b"]).models == ["a", "B=b"]
    assert parse(["eval", "a", "--out", "o", "runs/b"]).models == ["a", "runs/b"]  # a model may be a bare path
    with pytest.raises(SystemExit):
        parse(["smoke", "r.yaml", "--steps", "3", "stray"])  # not key=value: still an error
