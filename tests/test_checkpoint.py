"""Options that change no weights follow the recipe when a run starts from a checkpoint; a save
starts no process that outlives it."""

import multiprocessing

import pytest
import torch

from drope_megatron import checkpoint, distributed
from drope_megatron.config import ParallelConfig
from tests.helpers import tiny_model, tiny_recipe

pytestmark = pytest.mark.usefixtures("megatron_world")


def test_recipe_runtime_options_replace_the_stored_ones(tmp_path):
    model, recipe = tiny_model()
    with distributed.session(single=True):
        checkpoint.save(model, recipe.model, tmp_path / "ckpt")
    assert checkpoint.model_config(tmp_path / "ckpt").fused_kernels is True
    wanted = tiny_recipe("model.fused_kernels=false", "model.softmax_scale=0.5",
                         "model.attention_temperature=log_length").model
    m, _, _ = checkpoint.prepare(tmp_path / "ckpt", ParallelConfig(), attention=checkpoint.runtime_options(wanted))
    assert (m.fused_kernels, m.softmax_scale, m.attention_temperature) == (False, 0.5, "log_length")
    megatron = checkpoint.runtime_options(tiny_recipe("model.attention_backend=megatron").model)
    assert checkpoint.prepare(tmp_path / "ckpt", ParallelConfig(), attention=megatron)[0].attention_backend == "megatron"
    # fused_kernels, the backend and the context always win (plain values); unset attention options keep
    # the stored ones.
    checkpoint.save(model, wanted, tmp_path / "tuned")
    defaults = checkpoint.runtime_options(recipe.model)
    m, _, _ = checkpoint.prepare(tmp_path / "tuned", ParallelConfig(), attention=defaults)
    assert (m.fused_kernels, m.softmax_scale, m.attention_temperature) == (True, 0.5, "log_length")


def test_trained_qk_norms_survive_a_load_that_adds_them(tmp_path):
    """Recalibrating a QK-norm checkpoint asks for the norms as a plain one does: its trained
    norms are loaded, not reset to 1 (only a checkpoint without them starts them at 1)."""
    model, recipe = tiny_model("model.qk_norm=true", "model.phase=drope")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                p.fill_(2.0)
    with distributed.session(single=True):
        checkpoint.save(model, recipe.model, tmp_path / "qk")
        loaded, m = checkpoint.load_model(tmp_path / "qk", ParallelConfig(), add_qk_norm=True)
        plain, _ = tiny_model("model.phase=drope")
        checkpoint.save(plain, tiny_recipe("model.phase=drope").model, tmp_path / "plain")
        added, _ = checkpoint.load_model(tmp_path / "plain", ParallelConfig(), add_qk_norm=True)
    norms = {n: p for n, p in loaded.named_parameters() if "q_layernorm" in n or "k_layernorm" in n}
    assert m.qk_norm and len(norms) == 2 * recipe.model.num_layers
    assert all(torch.all(p == 2.0) for p in norms.values())
    fresh = [p for n, p in added.named_parameters() if "q_layernorm" in n or "k_layernorm" in n]
    assert len(fresh) == len(norms) and all(torch.all(p == 1.0) for p in fresh)


def test_a_save_leaves_no_helper_process_behind(tmp_path, monkeypatch):
    # megatron-core's writer would otherwise spawn a results manager (a process importing torch)
    # on its first save and keep it until exit; a direct dist_checkpointing.save elsewhere in this
    # test process may have made one already, so this save starts as if it were the first.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    before = set(multiprocessing.active_children())
    model, recipe = tiny_model()
    with distributed.session(single=True):
        checkpoint.save(model, recipe.model, tmp_path / "ckpt")
    assert set(multiprocessing.active_children()) <= before
    with distributed.session(single=True):
        loaded = checkpoint.load_model(tmp_path / "ckpt", ParallelConfig())[0]
        # In bf16 every weight is bf16, the norms' too (megatron makes those in fp32): torch's fused norm.
        half = checkpoint.load_model(tmp_path / "ckpt", ParallelConfig(), dtype="bfloat16")[0]
    saved = model.state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items() if torch.is_tensor(t))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_a_planted_object_in_a_checkpoint_is_never_unpickled(tmp_path):
    """megatron-core unpickles a layer's `_extra_state` object unrestricted: a checkpoint from
    elsewhere could run code when loaded, so those objects are not read at all."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    marker = tmp_path / "code-ran"
    model, recipe = tiny_model()
    with distributed.session(single=True):
        sharded = model.sharded_state_dict()
        planted = {k: dataclasses.replace(v, data=_Planted(marker)) if isinstance(v, ShardedObject) else v
                   for k, v in sharded.items()}
        assert planted != sharded  # the layers do describe objects
        recipe.model.padded_vocab_size = recipe.model.padded_vocab(1)
        checkpoint.save_in_parts([planted], recipe.model, tmp_path / "ckpt")
        loaded = checkpoint.load_model(tmp_path / "ckpt", ParallelConfig())[0]
    assert not marker.exists()
    saved = model.state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items() if torch.is_tensor(t))


class _Planted:
    """Unpickling it touches a file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.path),)


def test_a_planted_checkpoint_index_is_refused_unread(tmp_path):
    """torch's checkpoint index (`.metadata`) is a pickle that megatron-core reads with pickle.load:
    one from elsewhere is vetted against what torch writes there before anything loads it."""
    import pickle

    from drope_megatron.config import ConfigError

    marker = tmp_path / "code-ran"
    model, recipe = tiny_model()
    with distributed.session(single=True):
        checkpoint.save(model, recipe.model, tmp_path / "ckpt")
        index = tmp_path / "ckpt" / "weights" / ".metadata"
        assert index.is_file()
        checkpoint.load_model(tmp_path / "ckpt", ParallelConfig())  # torch's own index passes
        index.write_bytes(pickle.dumps(_Planted(marker)))
        with pytest.raises(ConfigError, match=r"\.metadata is not a plain torch checkpoint index \(pathlib"):
            checkpoint.load_model(tmp_path / "ckpt", ParallelConfig())
    assert not marker.exists()
