"""The demo report's headlines: computed from the results, against the best RoPE method."""

from __future__ import annotations

from drope_megatron.demo.summary import headlines


def _row(ppl: float, accuracy: float, found: float, first: str = "1x") -> dict:
    return {"ppl": {first: {"ppl": ppl}}, "passkey": {"2x": {"accuracy": accuracy, "found": found}}}


def test_headlines_compare_drope_with_the_best_rope_method_of_each_measure():
    results = {"lengths": ["1x", "2x"], "tasks": ["ppl", "passkey"], "rows": {
        "RoPE": _row(10.0, 0.0, 0.875), "RoPE+pi": _row(12.0, 0.25, 0.5), "RoPE+ntk": _row(11.0, 0.5, 0.25),
        "RoPE+yarn": _row(11.5, 0.0, 0.75), "DroPE": _row(10.5, 0.75, 1.0)}}
    # Plain RoPE is a RoPE method too (the best one for "found" here); DroPE's two measures differ.
    assert headlines(results) == [
        "Perplexity at 1x: DroPE 10.50 vs RoPE 10.00 (+5.0 %).",
        "passkey at 2x: DroPE 75 % vs best RoPE method RoPE+ntk 50 %; needle found: DroPE 100 % vs RoPE 88 %.",
    ]


def test_perplexity_is_compared_at_the_first_length_evaluated():
    # A custom recipe without 1x (here token lengths): before, the report stage failed on it.
    results = {"lengths": ["512", "2x"], "tasks": ["ppl"],
               "rows": {"RoPE": _row(10.0, 0, 0, first="512"), "DroPE": _row(12.0, 0, 0, first="512")}}
    assert headlines(results) == ["Perplexity at 512: DroPE 12.00 vs RoPE 10.00 (+20.0 %)."]


def test_no_headline_for_what_was_not_measured():
    results = {"lengths": ["2x"], "tasks": ["passkey"], "rows": {"DroPE": {"passkey": {"2x": {"accuracy": 1.0, "found": 1.0}}}}}
    assert headlines(results) == []  # no RoPE row to compare with
