"""`drope eval`: every model x method x length x task, into one results dict and report folder.

Models are Megatron checkpoints or Hugging Face folders. A RoPE model is evaluated as is and with
each requested baseline (PI, NTK, YaRN) at every length; DroPE and per-layer models as they are.
All models see the same retrieval prompts (seeded by task, length, depth) at each length in
tokens, and the same documents when their longest length in tokens is the same (documents are
the first ones that hold it); a multiple like 2x is of each model's own training length.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import sys
import time
from pathlib import Path

from drope_megatron import atomic, checkpoint, distributed
from drope_megatron.config import ConfigError, EvalConfig, ParallelConfig, parse_length
from drope_megatron.eval import perplexity, report, retrieval, tasks
from drope_megatron.eval.backends import describe, hf_position_limit, model_kind, open_backend


def expand_tasks(names: list[str]) -> list[str]:
    """ppl and retrieval task names in a stable order; "niah" means every RULER task."""
    out = []
    for name in names:
        for task in tasks.NIAH if name == "niah" else (name,):
            if task not in out:
                out.append(task)
    return out


def parse_models(specs: list[str]) -> dict[str, Path]:
    """`label=path` or `path` (labelled by its folder name), labels unique. A label has no `/`, so
    `runs/lr=1e-4/final` is a path, and `DroPE=runs/lr=1e-4/final` labels it."""
    models: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or "/" in label or Path(spec).exists():
            label, path = Path(spec).name, spec
        if label in models:
            raise ConfigError(f"two models are labelled {label!r}: name them with label=path")
        if "+" in label:  # the report's rows are `label` and `label+method`: RoPE+pi would be ambiguous
            raise ConfigError(f"model label {label!r} has a '+', which marks a baseline's row (RoPE+pi): "
                              "name it with label=path")
        models[label] = Path(path)
        model_kind(models[label])
    return models


def run(models: dict[str, Path], e: EvalConfig, out: Path, overwrite: bool = False, tp: int = 1,
        dtype: str | None = None, progress: bool = True) -> dict | None:
    """Evaluate, then write the report to `out` on rank 0; returns the results there (None elsewhere)."""
    atomic.refuse_existing(out, overwrite, "results.json")
    if tp < 1:
        raise ConfigError(f"--tp {tp} must be >= 1")
    names = expand_tasks(e.tasks)
    if "ppl" in names and not e.data:
        raise ConfigError("perplexity needs held-out documents: pass --data FILE (text, json/jsonl or parquet)")
    for label, path in models.items():  # before any model runs: a late refusal would lose the others' work
        _check_lengths(label, path, e, names)
    results = {"lengths": list(e.lengths), "tasks": names, "seed": e.seed, "models": {}, "rows": {}, "seconds": {}}
    with distributed.session(ParallelConfig(tensor_model_parallel_size=tp), e.seed) as env:
        for label, path in models.items():
            start = time.perf_counter()
            with _transformers_bars(progress and env.rank == 0):
                backend = open_backend(path, dtype=dtype, tp=tp)
            results["models"][label] = describe(backend)
            results["rows"].update(_evaluate(backend, label, e, names, progress and env.rank == 0))
            results["seconds"][label] = round(time.perf_counter() - start, 1)
            del backend
            gc.collect()
        if env.rank != 0:
            return None
    _publish(results, out)
    return results


@contextlib.contextmanager
def _transformers_bars(on: bool):
    """transformers' loading bar follows --quiet too; its switch is process-wide, so it is restored."""
    if on:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_lengths(label: str, path: Path, e: EvalConfig, names: list[str]) -> None:
    """Every length fits the model: perplexity needs a token to predict, and a model with a table of
    positions (GPT-2, GPT-J) has none past it."""
    limit, train_length = (None, checkpoint.model_config(path).seq_length) if model_kind(path) == "megatron" \
        else hf_position_limit(path)
    lengths = [parse_length(text, train_length, key="--lengths") for text in e.lengths]
    if "ppl" in names and min(lengths) < 2:
        raise ConfigError(f"--lengths gives {label} a length of {min(lengths)} token: perplexity needs >= 2")
    if limit is not None and max(lengths) > limit:
        raise ConfigError(f"{label} ({path}) holds a table of {limit} positions, so it cannot run at "
                          f"{max(lengths)} tokens: evaluate it at lengths up to {limit} on its own")


def _evaluate(backend, label: str, e: EvalConfig, names: list[str], progress: bool) -> dict[str, dict]:
    lengths = {text: parse_length(text, backend.train_length, key="--lengths") for text in e.lengths}
    methods = ["none", *e.baselines] if backend.phase == "rope" and not backend.scaled else ["none"]
    why = f"already uses {backend.scaled} RoPE scaling" if backend.scaled else \
        "has no RoPE" if backend.phase == "other" else None
    if e.baselines and why and progress:
        print(f"drope eval: {label} {why}; baselines are run on plain RoPE models only", file=sys.stderr)
    for method in methods[1:]:  # a model that cannot take a method fails now, not after its first pass
        backend.use(method, backend.train_length)
    backend.use("none", backend.train_length)
    docs = (perplexity.long_documents(e.data, backend.tokenizer, max(lengths.values()), e.documents, e.text_key,
                                      backend.vocab_size) if "ppl" in names else [])
    if docs and len(docs) < e.documents and progress:
        print(f"drope eval: {label}: only {len(docs)} of the {e.documents} documents asked for hold "
              f"{max(lengths.values())} tokens; perplexity is over those", file=sys.stderr)
    prompts = {(task, text): retrieval.samples(task, backend.tokenizer, tokens, e.depths, e.samples, e.seed)
               for task in names if task != "ppl" for text, tokens in lengths.items()}
    rows: dict[str, dict] = {}
    for method in methods:
        row = rows.setdefault(label if method == "none" else f"{label}+{method}", {})
        for text, tokens in lengths.items():
            backend.use(method, tokens)
            if docs:
                value = perplexity.perplexity(backend, docs, tokens, progress=progress, label=label)
                row.setdefault("ppl", {})[text] = {"length_tokens": tokens, **value}
            for task in names:
                if task != "ppl":
                    value = retrieval.evaluate(backend, prompts[(task, text)], progress=progress, label=label)
                    row.setdefault(task, {})[text] = {"length_tokens": tokens, **value}
        backend.use("none", backend.train_length)
    return rows


def _publish(results: dict, out: Path) -> None:
    staging = atomic.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report.write(results, staging)
        atomic.publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
