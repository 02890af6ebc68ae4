"""Megatron indexed datasets: what the writer stores is what training reads back, and an empty
input leaves no files behind."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from drope_megatron.config import ConfigError, DataConfig
from drope_megatron.data.documents import check_ends, documents
from drope_megatron.data.indexed import write_indexed
from tests.helpers import ROOT, run


def test_round_trip_through_megatron_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5000, size=n).tolist() for n in (5, 300, 1, 77)]
    info = write_indexed(docs, tmp_path / "set", vocab_size=5000)
    assert info == {"documents": 4, "tokens": 383, "dtype": "uint16"}
    read = list(documents(DataConfig(paths=[str(tmp_path / "set")], format="megatron", shuffle=False), None, 0, 0))
    assert [r.tolist() for r in read] == docs
    big = write_indexed([[70000, 1]], tmp_path / "wide", vocab_size=100_000)
    assert big["dtype"] == "int32"


def test_empty_input_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="input is empty"):
        write_indexed([], tmp_path / "set", vocab_size=100)
    assert list(tmp_path.iterdir()) == []


def test_ids_outside_the_vocabulary_write_nothing(tmp_path):
    """uint16 storage would wrap 65536 to 0: an id past the vocabulary is refused, not stored."""
    write_indexed([[1, 2]], tmp_path / "set", vocab_size=100)
    with pytest.raises(ConfigError, match="document 1 has token id 65536 outside the vocabulary of 65536"):
        write_indexed([[1, 2], [3, 65536]], tmp_path / "set", vocab_size=2**16)
    # The earlier dataset stays whole: its data, index and counts.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.bin", "set.idx", "set.json"]
    read = documents(DataConfig(paths=[str(tmp_path / "set")], format="megatron", shuffle=False), None, 0, 0)
    assert [r.tolist() for r in read] == [[1, 2]]


def test_prepare_data_tool(tmp_path, capsys):
    import importlib.util

    from tests.train.corpus import build

    corpus = build(tmp_path / "c", docs=2, lines=120)
    paths = corpus["paths"].strip("[]").split(",")
    proc = run([sys.executable, "tools/prepare_data.py", "--input", *paths, "--tokenizer", corpus["tokenizer"],
                "--out", str(tmp_path / "out" / "train")], timeout=120)  # as a command, once
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "2 documents" in proc.stdout and (tmp_path / "out" / "train.idx").is_file()
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def prepare(*args) -> tuple[int, str, str]:  # the rest in this process: no re-imports
        code = tool.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    again = ["--input", paths[0], "--tokenizer", corpus["tokenizer"], "--out", tmp_path / "out" / "train"]
    code, _, err = prepare(*again)
    assert code == 2 and "pass --overwrite" in err
    assert '"documents": 2' in (tmp_path / "out" / "train.json").read_text()  # untouched
    code, out, _ = prepare(*again, "--overwrite")
    assert code == 0 and "1 documents" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "train.idx", "train.json"]
    code, _, err = prepare("--input", tmp_path / "missing.txt", "--tokenizer", corpus["tokenizer"], "--out",
                           tmp_path / "bad" / "x")
    assert code == 2 and "does not exist" in err and not (tmp_path / "bad").exists()
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    code, _, err = prepare("--input", tmp_path / "broken.jsonl", "--tokenizer", corpus["tokenizer"], "--out",
                           tmp_path / "bad" / "x")
    assert code == 2 and "cannot be read as json (JSON parse error" in err
    assert "Traceback" not in err and "Failed to load JSON" not in err
    assert not (tmp_path / "bad").exists()


def test_documents_without_eos_are_refused_for_training(tmp_path):
    """A set written without EOS (preprocess_data.py lacking --append-eod) would train on documents
    run together: refused, given the id that ends a document (the run's tokenizer's)."""
    d = DataConfig(paths=[str(tmp_path / "set")], format="megatron", shuffle=False)
    write_indexed([[5, 6, 2], [7, 2]], tmp_path / "set", vocab_size=100)
    check_ends(d, eos_id=2)
    write_indexed([[5, 6, 2], [7, 8]], tmp_path / "set", vocab_size=100)
    with pytest.raises(ConfigError, match=r"document 1 does not end with the tokenizer's EOS \(id 2\)"):
        check_ends(d, eos_id=2)
    assert [r.tolist() for r in documents(d, None, 0, 0)] == [[5, 6, 2], [7, 8]]  # evaluation reads it as is
    write_indexed([[5, 6], [7, 2]], tmp_path / "set", vocab_size=100)
    with pytest.raises(ConfigError, match=r"document 0 does not end"):
        check_ends(d, eos_id=2)
