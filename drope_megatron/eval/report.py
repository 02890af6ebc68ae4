"""The evaluation report: `results.json` (every number), `report.md` (tables: rows are models and
methods, columns are lengths) and PNG plots (perplexity vs length, per-position loss, retrieval
accuracy by length and depth)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402


def write(results: dict, out: Path) -> list[Path]:
    """All report files into `out` (a folder being staged); returns the plots written."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures = {}
    if _has(results, "ppl"):
        figures.update({"ppl_vs_length.png": ppl_figure(results), "position_loss.png": position_figure(results)})
    for task in results["tasks"]:
        if task != "ppl" and _has(results, task):
            figures[f"retrieval_{task}.png"] = heatmap_figure(results, task)
    plots = [_save(figure, out / name) for name, figure in figures.items()]
    (out / "report.md").write_text(markdown(results, [p.name for p in plots]))
    return plots


def _has(results: dict, task: str) -> bool:
    return any(task in row for row in results["rows"].values())


def markdown(results: dict, plots: list[str]) -> str:
    lines = ["# Long-context evaluation", ""]
    for label, info in results["models"].items():
        lines.append(f"- **{label}**: `{info['path']}` (phase {info['phase']}, trained at {info['train_length']} "
                     f"tokens)")
    lines += _relative_lengths_note(results)
    for task in results["tasks"]:
        if not _has(results, task):
            continue
        if task == "ppl":
            lines += _table(results, task, "Perplexity (lower is better)", "ppl")
        else:
            lines += _table(results, task, f"{task}: exact-match accuracy (%)", "accuracy")
            lines += _table(results, task, f"{task}: needle found, the answer's first token right (%)", "found")
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _relative_lengths_note(results: dict) -> list[str]:
    """A multiple like 2x is of each model's own training length: said where the models' differ."""
    trained = {info["train_length"] for info in results["models"].values()}
    relative = [text for text in results["lengths"] if text.endswith("x")]
    if len(trained) < 2 or not relative:
        return []
    return ["", f"Note: the models train at different lengths ({', '.join(map(str, sorted(trained)))} tokens), so a "
                f"column such as {relative[0]} holds a different token count for each (`length_tokens` in "
                "results.json); give the lengths in tokens to compare models at equal lengths."]


def _table(results: dict, task: str, title: str, key: str) -> list[str]:
    lengths = results["lengths"]
    lines = ["", f"## {title}", "", "| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for row, values in results["rows"].items():
        cells = [_cell(values.get(task, {}).get(length), key) for length in lengths]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: dict | None, key: str) -> str:
    if value is None or key not in value:
        return "-"
    return f"{value[key]:.2f}" if key == "ppl" else f"{100 * value[key]:.0f}"


def ppl_figure(results: dict):
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, values in results["rows"].items():
        points = [(v["length_tokens"], v["ppl"]) for v in values.get("ppl", {}).values()]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=row)
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
           title="Perplexity by length")
    return _styled(fig, ax)


def position_figure(results: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, values in results["rows"].items():
        ppl = values.get("ppl", {})
        if not ppl:
            continue
        longest = max(ppl.values(), key=lambda v: v["length_tokens"])
        width, last = longest["bin_width"], longest["length_tokens"] - 1  # losses at positions 1..last
        # Each bin's middle position: bin i holds 1 + i * width .. (i + 1) * width, the last one less.
        xs = [(1 + i * width + min(last, (i + 1) * width)) / 2 for i in range(len(longest["position_loss"]))]
        ax.plot(xs, longest["position_loss"], label=row)
    for info in results["models"].values():
        ax.axvline(info["train_length"], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="position (tokens); dashed: training length", ylabel="mean loss (nats)",
           title="Loss by position at the longest length")
    return _styled(fig, ax)


def heatmap_figure(results: dict, task: str):
    rows = [(row, v[task]) for row, v in results["rows"].items() if task in v]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, (row, by_length) in zip(axes[0], rows):
        lengths = list(by_length)
        depths = list(next(iter(by_length.values()))["by_depth"])
        grid = [[by_length[length]["by_depth"][d] for length in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set(title=row, xlabel="length", ylabel="depth")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.suptitle(f"{task}: exact-match accuracy (%)")
    return fig


def _styled(fig, ax):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
