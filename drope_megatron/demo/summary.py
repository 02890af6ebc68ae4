"""The demo's `report.md`: stage times, a few computed headline comparisons, the evaluation's
tables and plots, and the commands that reproduce each stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from drope_megatron import atomic

BASELINES = ("RoPE", "RoPE+pi", "RoPE+ntk", "RoPE+yarn")


def headlines(results: dict) -> list[str]:
    """One line per comparison the paper makes, computed from the numbers (never asserted)."""
    rows, lines = results["rows"], []
    drope = rows.get("DroPE", {})
    first = results["lengths"][0]  # the first length the recipe lists: 1x in the shipped ones
    if first in drope.get("ppl", {}) and first in rows.get("RoPE", {}).get("ppl", {}):
        ours, theirs = drope["ppl"][first]["ppl"], rows["RoPE"]["ppl"][first]["ppl"]
        lines.append(f"Perplexity at {first}: DroPE {ours:.2f} vs RoPE {theirs:.2f} "
                     f"({100 * (ours / theirs - 1):+.1f} %).")
    for task in results["tasks"]:
        if task == "ppl" or task not in drope:
            continue
        for length, value in drope[task].items():
            exact, found = (_best(rows, task, length, key) for key in ("accuracy", "found"))
            if exact is not None:
                lines.append(f"{task} at {length}: DroPE {100 * value['accuracy']:.0f} % vs best RoPE method "
                             f"{exact[1]} {100 * exact[0]:.0f} %; needle found: DroPE {100 * value['found']:.0f} % "
                             f"vs {found[1]} {100 * found[0]:.0f} %.")
    return lines


def _best(rows: dict, task: str, length: str, key: str) -> tuple[float, str] | None:
    """The best RoPE method's score and name at one length."""
    return max(((rows[b][task][length][key], b) for b in BASELINES if task in rows.get(b, {})), default=None)


def write_report(work: Path, log: dict, smoke: bool, pretrained_here: bool) -> Path:
    results = json.loads((work / "eval" / "results.json").read_text()) if (work / "eval" / "results.json").is_file() \
        else None
    lines = ["# DroPE demo", "", f"Work folder `{work}`; {os.cpu_count()} CPU cores."
             + (" **Smoke run: tiny sizes, the numbers mean nothing.**" if smoke else ""), "",
             "RoPE model: " + ("pretrained here with `recipes/demo-pretrain.yaml`." if pretrained_here else
                               "the shipped checkpoint `drope_megatron/demo/pretrained` (produced by "
                               "`recipes/demo-pretrain.yaml`; rerun with `drope demo --pretrain`)."),
             "", "| stage | seconds (when it ran) |", "|---|---|"]
    lines += [f"| {stage} | {value} |" for stage, value in log["seconds"].items()]
    if results is not None:
        lines += ["", "## Headlines", ""] + [f"- {line}" for line in headlines(results)]
        table = (work / "eval" / "report.md").read_text().split("\n", 2)[2]  # drop its title
        lines += ["", table.replace("](", "](eval/")]
    lines += ["", "## Commands the stages ran", "", "```"]
    lines += [line for stage in log["commands"] for line in log["commands"][stage]] + ["```"]
    path = work / "report.md"
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path
