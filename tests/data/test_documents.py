"""Documents of an epoch in their seeded order, from any document on (how a resume skips ahead),
empty rows not counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drope_megatron.config import ConfigError, DataConfig
from drope_megatron.data.documents import check_paths, documents, file_format, file_names, format_note, resolved
from drope_megatron.data.indexed import write_indexed
from drope_megatron.data.tokenizer import Tokenizer

CHARS = Tokenizer(lambda text: [ord(c) for c in text], lambda ids: "".join(map(chr, ids)), 0, 256, "chars")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    texts = [f"document {i} " + "x" * i for i in range(12)]
    rows = [*texts[:3], "", None, *texts[3:8], "", *texts[8:]]  # empty rows are no documents
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    write_indexed(([ord(c) for c in t] + [CHARS.eos_id] for t in texts), str(folder / "docs"), 256)
    return {"json": DataConfig(paths=[str(folder / "docs.jsonl")], format="json"),
            "megatron": DataConfig(paths=[str(folder / "docs")], format="megatron")}


@pytest.mark.parametrize("kind", ["json", "megatron"])
def test_an_epoch_from_a_later_document_is_the_rest_of_the_same_order(sources, kind):
    d = sources[kind]

    def read(epoch, start=0):
        return [np.asarray(doc).tolist() for doc in documents(d, CHARS, epoch, seed=5, start=start)]

    whole = read(1)
    assert len(whole) == 12 and read(1, start=7) == whole[7:]
    assert read(1, start=12) == []  # a checkpoint just after the epoch's last document
    assert read(2) != whole and sorted(map(tuple, read(2))) == sorted(map(tuple, whole))  # reshuffled per epoch


def test_several_indexed_sets_are_one_shuffled_collection(sources, tmp_path):
    extra = [[7] * n for n in range(1, 6)]
    write_indexed(extra, str(tmp_path / "extra"), 256)
    d = DataConfig(paths=[sources["megatron"].paths[0], str(tmp_path / "extra")], format="megatron")
    whole = [doc.tolist() for doc in documents(d, None, 0, seed=1)]
    assert len(whole) == 17 and all(doc in whole for doc in extra) and whole[12:] != extra
    assert [doc.tolist() for doc in documents(d, None, 0, seed=1, start=9)] == whole[9:]


def test_indexed_ids_beyond_the_models_vocabulary_are_refused(sources):
    d = sources["megatron"]  # characters: ids up to ord("x") = 120
    assert len(list(documents(d, None, 0, seed=1, vocab_size=121))) == 12
    with pytest.raises(ConfigError, match=r"holds token id 120 but the model's vocabulary is 100: it was "
                                          "tokenised with another tokenizer"):
        list(documents(d, None, 0, seed=1, vocab_size=100))
    with pytest.raises(ConfigError, match="holds token id 120 but the model's vocabulary is 120"):
        list(documents(d, None, 0, seed=1, vocab_size=120))  # ids run 0 .. vocab_size - 1


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_json_and_values_that_are_not_text_fail_in_one_line(tmp_path, streaming):
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 0}\n')  # falsy, yet not "no text"
    for name, message in (("broken", r"broken\.jsonl cannot be read as json \(JSON parse error: .* row 1\): fix the"),
                          ("numbers", r"numbers\.jsonl: a 'text' value is int, not text: fix the data or set")):
        d = DataConfig(paths=[str(tmp_path / f"{name}.jsonl")], format="json", streaming=streaming, shuffle=False)
        with pytest.raises(ConfigError, match=message):
            list(documents(d, CHARS, 0, seed=0))
    # Files whose columns differ: streamed, datasets raised its CastError bare (a traceback).
    (tmp_path / "other.jsonl").write_text('{"content": "a column of another name"}\n')
    d = DataConfig(paths=[str(tmp_path / "numbers.jsonl"), str(tmp_path / "other.jsonl")], format="json",
                   streaming=streaming, shuffle=False)
    with pytest.raises(ConfigError, match=r"cannot be read as json \(.*(cast|column).*\): fix the"):
        list(documents(d, CHARS, 0, seed=0))


def test_hub_data_is_one_name_and_a_failed_load_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # What a machine without the hub sees, at once (datasets read the variables at import).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="data.format=hub reads one dataset name, data.paths has 2"):
        list(documents(DataConfig(paths=["org/a", "org/b"], format="hub"), CHARS, 0, seed=0))
    with pytest.raises(ConfigError, match="hub dataset someorg/nonexistent-ds cannot be loaded"):
        list(documents(DataConfig(paths=["someorg/nonexistent-ds"], format="hub"), CHARS, 0, seed=0))


def test_the_format_is_told_by_the_paths_by_default(sources, tmp_path):
    """Before, the default was text: a .jsonl file trained as raw JSON lines, as one document."""
    import gzip

    jsonl, prefix = sources["json"].paths[0], sources["megatron"].paths[0]
    assert DataConfig().format == "auto"
    for paths in ([jsonl], [prefix]):
        assert len(list(documents(DataConfig(paths=paths), CHARS, 0, seed=1))) == 12
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress(open(jsonl, "rb").read()))
    assert file_format([str(packed)]) == "json" and file_format([str(tmp_path / "*.parquet")]) == "parquet"
    assert file_format([str(tmp_path / "notes.txt")]) == "text"
    assert [doc for doc in documents(DataConfig(paths=[str(packed)], shuffle=False), CHARS, 0, seed=0)][0][:8] == \
        [ord(c) for c in "document"]
    with pytest.raises(ConfigError, match=r"the files mix kinds \(json, megatron\)"):
        list(documents(DataConfig(paths=[jsonl, prefix]), CHARS, 0, seed=1))


def test_a_folder_is_refused_with_the_glob_to_use(tmp_path):
    (tmp_path / "pq").mkdir()
    with pytest.raises(ConfigError, match=f"data path {tmp_path / 'pq'} is a folder: list its files, e.g. "):
        list(documents(DataConfig(paths=[str(tmp_path / "pq")], format="parquet"), CHARS, 0, seed=0))


def test_a_stream_knows_its_files_by_name_wherever_they_are(sources, tmp_path):
    """What a resumed stream must find again: the files, globs expanded, not the folder they sit in
    (a run resumed from a node's local copy of the data)."""
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert file_names(DataConfig(paths=[str(tmp_path / "*.jsonl")])) == ["a.jsonl", "b.jsonl"]
    assert file_names(DataConfig(paths=["a.jsonl", "b.jsonl"])) == ["a.jsonl", "b.jsonl"]
    assert file_names(sources["megatron"]) == ["docs"]


def test_half_of_a_megatron_dataset_names_its_prefix(sources):
    prefix = sources["megatron"].paths[0]
    with pytest.raises(ConfigError, match=f"data path {prefix}.bin is half of a Megatron dataset: list its prefix"):
        check_paths(resolved(DataConfig(paths=[prefix + ".bin"])))


def test_text_format_on_json_names_is_noted():
    """Told explicitly, text is honoured (raw text may be named anything), but the run says so."""
    note = format_note(DataConfig(paths=["a.jsonl", "b.txt"], format="text"))
    assert "reads a.jsonl, b.txt as plain text" in note and "names say json" in note
    assert format_note(DataConfig(paths=["a.jsonl"], format="auto")) is None
    assert format_note(DataConfig(paths=["a.txt"], format="text")) is None
