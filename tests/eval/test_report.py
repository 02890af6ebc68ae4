"""The evaluation's markdown: one row per model or method, one column per length, the numbers as
measured (perplexity to 2 decimals, retrieval in %), "-" where nothing was measured; the plots
draw those numbers where their labels say."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from drope_megatron.eval.report import heatmap_figure, markdown, position_figure, ppl_figure


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


def _plotted() -> dict:
    def ppl(tokens, value, losses):
        return {"length_tokens": tokens, "ppl": value, "bin_width": 4, "position_loss": losses}

    return {"models": {"DroPE": {"path": "d", "phase": "drope", "train_length": 8}}, "tasks": ["ppl", "passkey"],
            "lengths": ["2x", "1x"],
            "rows": {"DroPE": {"ppl": {"2x": ppl(16, 9.0, [3.0, 2.5, 2.0, 1.5]), "1x": ppl(8, 7.0, [3.0, 2.0])},
                               "passkey": {"1x": {"by_depth": {"0": 1.0, "0.5": 0.25}},
                                           "2x": {"by_depth": {"0": 0.5, "0.5": 0.0}}}},
                     "RoPE": {"ppl": {"1x": ppl(8, 6.0, [2.0, 1.0])}}}}


def test_plots_draw_the_measured_numbers_under_their_labels():
    results = _plotted()
    fig = ppl_figure(results)
    ax = fig.axes[0]
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    assert lines == {"DroPE": [[8, 7.0], [16, 9.0]], "RoPE": [[8, 6.0]]}  # by length, perplexity (not loss)
    assert ax.get_ylabel() == "perplexity"
    fig = position_figure(results)  # the longest length's bins at their middle positions 1..15
    drope = next(line for line in fig.axes[0].lines if line.get_label() == "DroPE")
    assert drope.get_xydata().tolist() == [[2.5, 3.0], [6.5, 2.5], [10.5, 2.0], [14.0, 1.5]]
    fig = heatmap_figure(results, "passkey")
    ax = fig.axes[0]
    assert np.array_equal(ax.images[0].get_array(), [[1.0, 0.5], [0.25, 0.0]])  # rows: depths, columns: lengths
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "0.5"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1x", "2x"]
    plt.close("all")
