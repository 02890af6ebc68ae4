"""Document sources: Hugging Face `datasets` (local text/json/parquet, a hub name) and Megatron
indexed datasets (.bin/.idx, already tokenised), as token-id documents in a seeded order."""

from __future__ import annotations

import dataclasses
import glob
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from drope_megatron.config import ConfigError, DataConfig
from drope_megatron.data.tokenizer import Tokenizer
from drope_megatron.typed_yaml import first_line


SUFFIX_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # anything else: text
COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".lz4"}  # datasets reads through these: a.jsonl.gz is json


def file_format(paths: list[str]) -> str:
    """The one `DataConfig.format` of local files (or globs), from their suffixes; a path prefix
    of a .bin/.idx pair is a Megatron dataset."""
    kinds = {_kind(p) for p in paths}
    if len(kinds) != 1:
        raise ConfigError(f"the files mix kinds ({', '.join(sorted(kinds))}): pass files of one kind")
    return kinds.pop()


def _kind(path: str) -> str:
    if Path(path + ".bin").is_file() and Path(path + ".idx").is_file():
        return "megatron"
    suffixes = Path(path).suffixes
    while suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "", "text")


def file_names(d: DataConfig) -> list[str]:
    """The names of the files (or dataset prefixes) `d` reads, globs expanded, without their
    folders: what a resumed stream must find again, wherever the data was moved (a node's disk)."""
    if d.format == "hub":
        return list(d.paths)
    return [Path(f).name for p in d.paths for f in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])]


def check_paths(d: DataConfig) -> None:
    """Every local path is there and of its kind: found before a run starts (or writes anything)."""
    if d.format == "hub":
        if len(d.paths) != 1:
            raise ConfigError(f"data.format=hub reads one dataset name, data.paths has {len(d.paths)}: "
                              "train on one (or list downloaded files instead)")
        return
    if d.format == "megatron":
        for prefix in d.paths:
            if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
                raise ConfigError(f"Megatron dataset {prefix}.bin/.idx not found: data.paths takes path prefixes")
        return
    halves = [p for p in d.paths if p.endswith((".bin", ".idx")) and _kind(p[:-4]) == "megatron"]
    if halves:  # read as text otherwise: binary token ids taken for characters
        raise ConfigError(f"data path {halves[0]} is half of a Megatron dataset: list its prefix {halves[0][:-4]}")
    missing = [p for p in d.paths if not (glob.glob(p) if glob.has_magic(p) else Path(p).exists())]
    if missing:
        raise ConfigError(f"data file {missing[0]} does not exist: fix data.paths")
    folders = [p for p in d.paths if Path(p).is_dir()]
    if folders:  # datasets would say it cannot find a folder that is there
        raise ConfigError(f"data path {folders[0]} is a folder: list its files, e.g. {folders[0]}/*.parquet")


def format_note(d: DataConfig) -> str | None:
    """A note when `data.format=text` is told for files whose names say json or parquet: legitimate
    (raw text that happens to be named so), but more often a recipe written before `auto`."""
    named = {_kind(p) for p in d.paths} - {"text"} if d.format == "text" else set()
    if named:
        return (f"data.format=text reads {', '.join(d.paths)} as plain text (one document per file) although "
                f"the names say {'/'.join(sorted(named))}: remove data.format to read their data.text_key")
    return None


def resolved(d: DataConfig) -> DataConfig:
    """`d` with `format: auto` decided from its files."""
    return dataclasses.replace(d, format=file_format(d.paths)) if d.format == "auto" else d


def documents(d: DataConfig, tokenizer: Tokenizer | None, epoch: int, seed: int,
              start: int = 0, vocab_size: int | None = None) -> Iterator[list[int] | np.ndarray]:
    """Token ids of the documents of one epoch from its `start`-th on: those before are skipped
    untokenised (a streamed source still reads them), which is how a resumed run gets back to its
    place. Text documents start with the tokenizer's BOS if it adds one and end with the EOS.
    Already tokenised (Megatron) documents are checked against `vocab_size`, when given: ids from
    another tokenizer would train silently on the wrong embeddings (megatron's vocab-parallel
    layers mask ids beyond their range)."""
    d = resolved(d)
    check_paths(d)
    if d.format == "megatron":
        yield from _indexed(d, epoch, seed, start, vocab_size)
        return
    import pyarrow
    from datasets.exceptions import DatasetGenerationError
    from datasets.table import CastError  # files whose columns differ, raised bare when streaming

    try:
        # Empty rows go before the order is fixed, so that `start` counts the documents packing saw.
        dataset = _hf_dataset(d).filter(_has_text, input_columns=[d.text_key], batched=True)
        if d.shuffle:
            dataset = dataset.shuffle(seed=seed + epoch)
        if start and not d.streaming and start >= len(dataset):
            return  # a checkpoint taken just after an epoch's last document (skip would raise)
        if start:
            dataset = dataset.skip(start)
        for row in dataset:  # a streamed file is parsed only here
            text = row[d.text_key]
            if not isinstance(text, str):
                raise ConfigError(f"data in {', '.join(d.paths)}: a {d.text_key!r} value is {type(text).__name__}, "
                                  "not text: fix the data or set data.text_key")
            yield [*tokenizer.bos, *tokenizer.encode(text), tokenizer.eos_id]
    except (DatasetGenerationError, CastError, pyarrow.ArrowException) as exc:
        cause = first_line(exc.__cause__ or exc)
        raise ConfigError(f"data in {', '.join(d.paths)} cannot be read as {d.format} ({cause}): fix the file or "
                          "data.format") from None


def _has_text(texts: list) -> list[bool]:
    """Rows with no text are no documents; a value that is not text stays, for `documents` to refuse."""
    return [t is not None and t != "" for t in texts]


def _hf_dataset(d: DataConfig):
    import datasets

    if d.format == "hub":
        try:
            return datasets.load_dataset(d.paths[0], split="train", streaming=d.streaming)
        except (OSError, ValueError) as exc:  # offline, no such dataset, a config name needed
            raise ConfigError(f"hub dataset {d.paths[0]} cannot be loaded ({first_line(exc)}): check the name, "
                              "the network, or download it and list its files in data.paths") from None
    builder = {"text": "text", "json": "json", "parquet": "parquet"}[d.format]
    # Its json reader logs a parse error before raising it; `documents` turns the raise into one line.
    datasets.utils.logging.get_logger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    kwargs = {"sample_by": "document"} if d.format == "text" else {}  # one file = one document
    dataset = datasets.load_dataset(builder, data_files=list(d.paths), split="train", streaming=d.streaming,
                                    **kwargs)
    if d.text_key not in (dataset.column_names or [d.text_key]):
        raise ConfigError(f"data has no column {d.text_key!r} (columns: {dataset.column_names}): set data.text_key")
    return dataset


def _indexed(d: DataConfig, epoch: int, seed: int, start: int, vocab_size: int | None) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sets = [IndexedDataset(prefix) for prefix in d.paths]
    offsets = np.cumsum([0, *(len(ds) for ds in sets)])  # document k is in the set whose range holds it
    order = np.random.default_rng(seed + epoch).permutation(offsets[-1]) if d.shuffle else range(offsets[-1])
    for k in order[start:]:
        i = int(np.searchsorted(offsets, k, side="right")) - 1
        # A copy: the dataset's memory map closes with this generator, and views into it would not survive.
        doc = np.array(sets[i][int(k - offsets[i])])
        if vocab_size is not None and doc.size and int(doc.max()) >= vocab_size:
            raise ConfigError(f"Megatron dataset {d.paths[i]} holds token id {int(doc.max())} but the model's "
                              f"vocabulary is {vocab_size}: it was tokenised with another tokenizer; prepare "
                              "it again with the model's own")
        yield doc


def check_ends(d: DataConfig, eos_id: int, sample: int = 16) -> None:
    """For training: the first documents of each indexed set end with the EOS. Packing adds nothing
    between documents, so a set written without it (preprocess_data.py lacking --append-eod) would
    train on documents run together."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in d.paths if d.format == "megatron" else ():
        ds = IndexedDataset(prefix)
        bad = next((k for k in range(min(sample, len(ds))) if not ds[k].size or int(ds[k][-1]) != eos_id), None)
        if bad is not None:
            raise ConfigError(f"Megatron dataset {prefix}: document {bad} does not end with the tokenizer's EOS "
                              f"(id {eos_id}), so documents would run together: prepare it with "
                              "tools/prepare_data.py or Megatron-LM's preprocess_data.py --append-eod "
                              "(without --split-sentences, whose sentences are read as documents)")
