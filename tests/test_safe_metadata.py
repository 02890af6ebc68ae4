"""A checkpoint's torch index is vetted before megatron-core unpickles it: torch's own metadata
passes; a planted callable, a dotted name reaching past the allowed modules, a tensor stored as
pickled bytes, and a part folder outside the checkpoint are refused without running anything."""

import json
import pickle

import pytest

from drope_megatron import checkpoint, distributed, safe_metadata
from drope_megatron.config import ConfigError, ParallelConfig
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


@pytest.fixture()
def saved(tmp_path):
    model, recipe = tiny_model()
    with distributed.session(single=True):
        checkpoint.save(model, recipe.model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _global(module: str, name: str) -> bytes:
    """Pickle protocol 4's STACK_GLOBAL of module.name, as a crafted file would write it."""
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def test_torch_index_passes_and_crafted_ones_are_refused(saved):
    index = saved / "weights" / safe_metadata.METADATA
    safe_metadata.vet(index.parent)
    original = index.read_bytes()
    # A dotted name resolved through an allowed module reached operator.attrgetter (a class): the
    # first step of a chain to os.system.
    index.write_bytes(b"\x80\x04" + _global("torch.distributed.checkpoint.planner", "operator.attrgetter")
                      + b"\x8c\x01x\x85R.")
    with pytest.raises(ConfigError, match="planner.operator.attrgetter is not checkpoint metadata"):
        safe_metadata.vet(index.parent)
    # torch would read an entry stored as bytes with an unrestricted torch.load.
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads(original)  # this test's own file
    metadata.state_dict_metadata["embedding.word_embeddings.weight"] = BytesStorageMetadata()
    index.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConfigError, match="embedding.word_embeddings.weight is stored as pickled bytes"):
        safe_metadata.vet(index.parent)
    index.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(ConfigError, match="it holds a dict"):
        safe_metadata.vet(index.parent)
    # torch's own loader, and an allowed class name in a module it does not belong to
    for module, name in (("torch", "load"), ("os", "Metadata"), ("builtins", "eval")):
        index.write_bytes(b"\x80\x04" + _global(module, name) + b"\x8c\x01x\x85R.")
        with pytest.raises(ConfigError, match=f"{module}.{name} is not checkpoint metadata"):
            safe_metadata.vet(index.parent)
    for damaged in (b"", original[: len(original) // 2], b"\x80\x04\x93."):  # empty, cut short, malformed
        index.write_bytes(damaged)
        with pytest.raises(ConfigError):
            safe_metadata.vet(index.parent)


def test_a_part_outside_the_checkpoint_is_refused(tmp_path, saved):
    (saved / "weights" / checkpoint.PARTS).write_text(json.dumps({"parts": {"../elsewhere": ["x"]}}))
    with distributed.session(single=True), pytest.raises(ConfigError, match="names '../elsewhere', not a folder"):
        checkpoint.load_model(saved, ParallelConfig())
