"""The model's tokenizer: a Hugging Face tokenizer folder or a sentencepiece .model file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from drope_megatron.config import ConfigError
from drope_megatron.typed_yaml import first_line


SENTENCEPIECE = "tokenizer.model"
# A tokenizer folder's files (and generation settings, which travel with it); nothing else of a
# model folder given as `data.tokenizer` is ever copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", SENTENCEPIECE, "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")  # the older file of a chat template


@dataclass
class Tokenizer:
    """What packing and evaluation need: text <-> ids, the end-of-document id, how many ids there are,
    and the ids the model expects before a text (Llama's, Gemma's BOS; none for most others)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    vocab_size: int
    source: str
    bos: tuple[int, ...] = ()


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return _sentencepiece(path)
    if path.is_dir() and (path / SENTENCEPIECE).is_file() and not (path / "tokenizer_config.json").is_file():
        return _sentencepiece(path / SENTENCEPIECE)  # a checkpoint's copy of a bare sentencepiece model
    if path.is_dir():
        return _hugging_face(path)
    raise ConfigError(f"tokenizer {path} is neither a Hugging Face tokenizer folder nor a sentencepiece .model "
                      "file: set data.tokenizer")


def _sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.eos_id() < 0:
        raise ConfigError(f"sentencepiece model {path} has no EOS piece: train it with eos_id set")
    return Tokenizer(lambda text: sp.encode(text), lambda ids: sp.decode(list(ids)), sp.eos_id(), sp.get_piece_size(), str(path))


def _hugging_face(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path} ({first_line(exc)})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {path} has no eos_token: documents could not be separated")
    return Tokenizer(lambda text: tok(text, add_special_tokens=False)["input_ids"],
                     lambda ids: tok.decode(list(ids), skip_special_tokens=True), tok.eos_token_id, len(tok),
                     str(path), _prefix(tok))


def _prefix(tok) -> tuple[int, ...]:
    """What the tokenizer puts before a text by default (its BOS, if it adds one): documents and
    prompts start with it, as they did when the model was trained."""
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return tuple(full[:k])
    return ()
