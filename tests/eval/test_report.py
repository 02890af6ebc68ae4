"""The evaluation's markdown: one row per model or method, one column per length, the numbers as
measured (perplexity to 2 decimals, retrieval in %), "-" where nothing was measured."""

from __future__ import annotations

from drope_megatron.eval.report import markdown


def test_tables_hold_the_measured_numbers():
    results = {
        "models": {"DroPE": {"path": "runs/d", "phase": "drope", "train_length": 256}},
        "tasks": ["ppl", "passkey"], "lengths": ["1x", "2x"],
        "rows": {"DroPE": {"ppl": {"1x": {"ppl": 12.3456}, "2x": {"ppl": 15.0}},
                           "passkey": {"2x": {"accuracy": 0.75, "found": 1.0}}},
                 "RoPE+yarn": {"ppl": {"1x": {"ppl": 11.111}}}}}
    text = markdown(results, ["ppl_vs_length.png"])
    tables = {block.split("\n")[0]: block for block in text.split("\n## ")[1:]}
    assert "| DroPE | 12.35 | 15.00 |" in tables["Perplexity (lower is better)"]
    assert "| RoPE+yarn | 11.11 | - |" in tables["Perplexity (lower is better)"]
    assert "| DroPE | - | 75 |" in tables["passkey: exact-match accuracy (%)"]
    assert "| DroPE | - | 100 |" in tables["passkey: needle found, the answer's first token right (%)"]
    assert "| RoPE+yarn | - | - |" in tables["passkey: exact-match accuracy (%)"]
    assert "- **DroPE**: `runs/d` (phase drope, trained at 256 tokens)" in text
    assert text.rstrip().endswith("![ppl_vs_length.png](ppl_vs_length.png)")
    assert "Note:" not in text  # one training length: 2x means one token count


def test_relative_lengths_across_training_lengths_are_noted():
    models = {"A": {"path": "a", "phase": "drope", "train_length": 256},
              "B": {"path": "b", "phase": "rope", "train_length": 128}}
    results = {"models": models, "tasks": ["ppl"], "lengths": ["512", "2x"], "rows": {}}
    assert "different lengths (128, 256 tokens), so a column such as 2x holds" in markdown(results, [])
    assert "Note:" not in markdown({**results, "lengths": ["512", "1024"]}, [])  # tokens are equal lengths
