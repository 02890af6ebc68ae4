"""The tokenizer files of an exported Hugging Face folder.

A checkpoint whose tokenizer is a bare sentencepiece model (the demo's, or any `data.tokenizer`
given as a .model file) has nothing `AutoTokenizer` can read. The export converts it with
transformers' own sentencepiece converter into a `tokenizer.json` (normaliser, dummy prefix, byte
fallback as sentencepiece does them) and refuses to publish one that encodes differently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from drope_megatron.config import ConfigError
from drope_megatron.data.tokenizer import SENTENCEPIECE, TOKENIZER_FILES
from drope_megatron.typed_yaml import first_line

# Newlines, runs of spaces, digits, non-Latin text and byte fallback: where converters go wrong.
PROBE = "The pass key is 12345.\n\nACT I.  SCENE 1 --  naïve café, 東京 🙂\tend"


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of the checkpoint's tokenizer folder `src` into the export folder
    `dst` (nothing else: never a model's config or weights), adding Hugging Face tokenizer files
    when it holds only a sentencepiece model."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (dst / SENTENCEPIECE).is_file() and not (dst / "tokenizer_config.json").is_file():
        _from_sentencepiece(dst)


def _from_sentencepiece(folder: Path) -> None:
    import sentencepiece
    from transformers import AutoTokenizer

    # The generic backend builds the tokenizer from the .model's own settings (no Llama defaults).
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (ImportError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot convert {folder / SENTENCEPIECE} for transformers "
                          f"({first_line(exc)}): check that it is a sentencepiece model and that "
                          "protobuf is installed") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / SENTENCEPIECE))
    if tok(PROBE, add_special_tokens=False)["input_ids"] != sp.encode(PROBE):
        raise ConfigError(f"transformers encodes text unlike {SENTENCEPIECE} after conversion: "
                          "export the tokenizer by hand")
    tok.save_pretrained(str(folder))
    # The class name every transformers release reads a tokenizer.json with (v5 aliases it).
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for machine_local in ("is_local", "local_files_only"):
        config.pop(machine_local, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
