"""typed_yaml: a dataclass built from YAML and dotted overrides, each value checked against its type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from drope_megatron.typed_yaml import ConfigError, apply_override, build, first_line, read_yaml


@dataclass
class Inner:
    sizes: list[int] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    lr: float = 1.0
    name: Optional[str] = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_a_file_and_overrides_build_typed_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\ninner:\n  sizes: [1, 2]\n")
    raw = read_yaml(path)
    for item in ("inner.mode=b", "name=8192", "flag=true"):
        apply_override(raw, item)
    built = build(Outer, raw, "")
    assert built == Outer(lr=1e-4, name="8192", flag=True, inner=Inner(sizes=[1, 2], mode="b"))


@pytest.mark.parametrize("raw, message", [
    ({"lrr": 1}, r"unknown key lrr \(did you mean lr\?\)"),
    ({"inner": {"sizes": [1, "x"]}}, r"inner.sizes\[1\] must be int, got 'x'"),
    ({"inner": {"mode": "c"}}, "inner.mode='c' is not one of a, b"),
    ({"flag": "yes"}, "flag must be bool"),
    ({"lr": float("nan")}, "lr must be float"),
    ({"inner": 3}, "inner must be a mapping"),
    ({"flag": 1}, "flag must be bool, got 1"),
    ({"lr": True}, "lr must be float, got True"),
    ({"lr": None}, "lr must be float, got None"),  # only Optional keys take null
    ({"inner": {"sizes": 3}}, "inner.sizes must be a list, got 3"),
    ({"inner": {"sizes": [True]}}, r"inner.sizes\[0\] must be int, got True"),
    ({"inner": {"sizes": ["0x1F"]}}, r"inner.sizes\[0\] must be int, got '0x1F'"),
])
def test_each_problem_names_its_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        build(Outer, raw, "")


def test_overrides_keep_the_text_of_numbers_yaml_would_rewrite():
    """YAML 1.1 reads 0123 as octal 83 and 0x1F as 31: a name or path given so must stay as typed."""
    raw = {}
    for item in ("name=0123", "inner.sizes=[8]", "lr=2"):
        apply_override(raw, item)
    assert build(Outer, raw, "").name == "0123"
    for text in ("0x1F", "1_000", "+5"):
        apply_override(raw, f"name={text}")
        assert build(Outer, raw, "").name == text
    apply_override(raw, "name=")
    assert build(Outer, raw, "").name == ""  # an empty value is empty text, not null
    for text, number in (("0123", 123), ("1_000", 1000), ("+5", 5)):  # an int key reads them as decimals
        assert build(Outer, {"inner": {"sizes": [text]}}, "").inner.sizes == [number]


def test_an_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="override lr.x: lr is a value, not a section"):
        apply_override({"lr": 1.0}, "lr.x=2")


def test_first_line_of_a_library_error():
    assert first_line(OSError("  no such file\n  at line 3")) == "no such file"
    assert first_line(RuntimeError()) == "RuntimeError"  # an empty message still names something
